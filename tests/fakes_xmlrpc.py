"""
In-process XML-RPC servers for tests: a generic one that can misbehave on
request, a fake Koji hub and a fake Bugzilla, all on C{twisted.web}.

The fakes hold a small model of their service that tests change over time
(builds start and finish, tags change, bugs get comments), and answer the
calls the pollers make the way the real services do: Koji's C{__starstar}
keyword convention and C{multiCall}, its date strings and C{*_ts} numbers,
its strict C{afterEvent}/C{beforeEvent} history semantics; Bugzilla's
C{Bug.search}/C{Bug.history}/C{Bug.comments} structures with
C{dateTime.iso8601} values.  The Koji model starts from the recorded hub
answers in C{tests/data/koji/}.

Misbehaviour: put names in L{FakeXMLRPCServer.misbehave} (one per request,
in order) or set L{FakeXMLRPCServer.mode} for every request:

  - C{"fault"}: an XML-RPC fault;
  - C{"http500"}: an HTTP 500 page;
  - C{"truncated"}: half of a good answer, cleanly ended;
  - C{"cut"}: half of a good answer, then the connection drops;
  - C{"not_xml"}: an HTML page with status 200;
  - C{"billion_laughs"}: nested entity definitions;
  - C{"external_entity"}: an external entity pointing at a local file;
  - C{"huge"}: a well-formed answer of L{FakeXMLRPCServer.huge_size} bytes
    (100 MB by default), produced only as fast as the client reads it;
  - C{"hang"}: accept the request and never answer;
  - C{"stalled_error"}: start an HTTP 500 page and never finish it;
  - C{"stalled_huge"}: announce a C{Content-Length} of
    L{FakeXMLRPCServer.huge_size} bytes, then send nothing.

Requests left unfinished are in L{FakeXMLRPCServer.hanging}; those whose
connection the client dropped are also in L{FakeXMLRPCServer.dropped}.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import xmlrpc.client
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IPullProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from fedhub.message import Message, dump_line
from fedhub.xmlrpc import Call, IXMLRPCCaller, XMLRPCFault, encode_call

DATA = os.path.join(os.path.dirname(__file__), "data", "koji")


def koji_sample(name: str) -> Any:
    """
    The C{result} of one recorded Koji answer in C{tests/data/koji/}.
    """
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)["result"]


def koji_bodies() -> list[dict[str, Any]]:
    """
    The Fedora bus messages (topic, body) of C{fedora_messaging_bodies.json}.
    """
    with open(os.path.join(DATA, "fedora_messaging_bodies.json")) as f:
        return list(json.load(f)["messages"])


BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        b' <!ENTITY lol%d "%s">\n' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]>\n<methodResponse><params><param><value><string>&lol9;</string></value>"
    b"</param></params></methodResponse>\n"
)

EXTERNAL_ENTITY = (
    b'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY secret SYSTEM "file:///etc/passwd">]>\n'
    b"<methodResponse><params><param><value><string>&secret;</string></value>"
    b"</param></params></methodResponse>\n"
)


class _HubMarshaller(xmlrpc.client.Marshaller):
    """
    Marshals like Koji's hub: integers beyond 32 bits as C{<i8>}.
    """

    dispatch = dict(xmlrpc.client.Marshaller.dispatch)

    def dump_int(self, value: int, write: Any) -> None:
        tag = "int" if -(2**31) <= value < 2**31 else "i8"
        write(f"<value><{tag}>{value}</{tag}></value>\n")

    dispatch[int] = dump_int  # type: ignore[assignment]


def response_xml(value: Any) -> str:
    """
    A method response carrying C{value}, with C{<nil/>} and C{<i8>}.
    """
    params = _HubMarshaller("utf-8", allow_none=True).dumps((value,))
    return f"<?xml version='1.0'?>\n<methodResponse>\n{params}</methodResponse>\n"


@implementer(IPullProducer)
class _Flood:
    """
    Writes a huge, well-formed XML-RPC answer one chunk each time the
    transport asks for more, so the server never holds it in memory.
    """

    CHUNK = b"<value><string>" + b"x" * 65000 + b"</string></value>"

    def __init__(self, request: Request, server: FakeXMLRPCServer, total: int) -> None:
        self.request = request
        self.server = server
        self.total = total
        self.stopped = False
        request.write(b"<?xml version='1.0'?>\n<methodResponse><params><param><value>"
                      b"<array><data>")
        server.flood_sent = 0

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        if self.server.flood_sent >= self.total:
            self.request.unregisterProducer()
            self.request.write(b"</data></array></value></param></params></methodResponse>\n")
            self.request.finish()
            return
        self.request.write(self.CHUNK)
        self.server.flood_sent += len(self.CHUNK)

    def stopProducing(self) -> None:
        self.stopped = True


class FakeXMLRPCServer(Resource):
    """
    An XML-RPC endpoint dispatching to C{handlers}, with Koji's keyword
    convention and multicall, and optional misbehaviour (module docstring).

    @ivar calls: Method names called, multicall entries included.
    @ivar requests: HTTP requests received.
    @ivar hanging: Requests left unanswered (C{"hang"} and the stalled modes).
    @ivar dropped: Those of them whose connection went away before an answer.
    @ivar flood_sent: Bytes of the last C{"huge"} answer written so far.
    """

    isLeaf = True

    def __init__(
        self,
        handlers: dict[str, Callable[..., Any]] | None = None,
        multicall_names: tuple[str, ...] = ("system.multicall",),
    ) -> None:
        super().__init__()
        self.handlers = dict(handlers or {})
        self.multicall_names = multicall_names
        self.mode: str | None = None
        self.misbehave: list[str] = []
        self.calls: list[str] = []
        self.requests = 0
        self.hanging: list[Request] = []
        self.dropped: list[Request] = []
        self.huge_size = 100 * 1024 * 1024
        self.flood_sent = 0

    def render_POST(self, request: Request) -> bytes | int:
        self.requests += 1
        assert request.content is not None
        body = request.content.read()
        mode = self.misbehave.pop(0) if self.misbehave else self.mode
        request.setHeader(b"content-type", b"text/xml")
        if mode in ("hang", "stalled_error", "stalled_huge"):
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: self.dropped.append(request))
            if mode == "stalled_error":
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/html")
                request.setHeader(b"content-length", b"100000")
                request.write(b"<html><body>Internal")
            elif mode == "stalled_huge":
                request.setHeader(b"content-length", b"%d" % self.huge_size)
                request.write(b"")  # the status line and headers only
            return NOT_DONE_YET
        if mode == "http500":
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/html")
            return b"<html><body>Internal Server Error</body></html>"
        if mode == "not_xml":
            request.setHeader(b"content-type", b"text/html")
            return b"<html><body><p>Service moved</body></html>"
        if mode == "billion_laughs":
            return BILLION_LAUGHS
        if mode == "external_entity":
            return EXTERNAL_ENTITY
        if mode == "huge":
            request.registerProducer(_Flood(request, self, self.huge_size), False)
            return NOT_DONE_YET
        if mode == "fault":
            return xmlrpc.client.dumps(xmlrpc.client.Fault(1000, "GenericError: the hub is sad"),
                                       methodresponse=True).encode()
        params, method = xmlrpc.client.loads(body, use_builtin_types=True)
        assert method is not None
        try:
            result = self.dispatch(method, params)
            payload = response_xml(result)
        except xmlrpc.client.Fault as fault:
            payload = xmlrpc.client.dumps(fault, methodresponse=True, allow_none=True)
        data = payload.encode("utf-8")
        if mode == "truncated":
            return data[: len(data) // 2]
        if mode == "cut":
            request.setHeader(b"content-length", b"%d" % len(data))
            request.write(data[: len(data) // 2])
            assert request.channel is not None and request.channel.transport is not None
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        return data

    def dispatch(self, method: str, params: tuple[Any, ...]) -> Any:
        """
        Call one method (a multicall runs each of its calls).
        """
        if method in self.multicall_names:
            results: list[Any] = []
            for entry in params[0]:
                try:
                    results.append([self.dispatch(entry["methodName"], tuple(entry["params"]))])
                except xmlrpc.client.Fault as fault:
                    results.append({"faultCode": fault.faultCode, "faultString": fault.faultString})
            return results
        self.calls.append(method)
        handler = self.handlers.get(method)
        if handler is None:
            raise xmlrpc.client.Fault(1000, f"Invalid method: {method}")
        args = list(params)
        kwargs: dict[str, Any] = {}
        if args and isinstance(args[-1], dict) and args[-1].get("__starstar"):
            kwargs = {k: v for k, v in args.pop().items() if k != "__starstar"}
        try:
            return handler(*args, **kwargs)
        except TypeError as e:
            raise xmlrpc.client.Fault(1000, f"ParameterError: {e}") from None

    def release_hanging(self) -> None:
        """
        Close the connections of requests left hanging.
        """
        while self.hanging:
            request = self.hanging.pop()
            if request.channel is not None and request.channel.transport is not None:
                cast(Any, request.channel.transport).abortConnection()


def listen(resource: Resource, reactor: Any) -> tuple[IListeningPort, str]:
    """
    Serve C{resource} on an ephemeral loopback port.

    @return: the port (stop it with C{stopListening}) and the endpoint URL.
    """
    site = Site(resource)
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}/RPC2"


# --- Koji ---------------------------------------------------------------

BUILDING, COMPLETE, DELETED, FAILED, CANCELED = range(5)
FREE, OPEN, CLOSED, TASK_CANCELED, ASSIGNED, TASK_FAILED = range(6)
REPO_INIT, REPO_READY, REPO_EXPIRED, REPO_DELETED, REPO_PROBLEM = range(5)

HISTORY_TABLES = (
    "user_perms", "user_groups", "cg_users", "tag_inheritance", "tag_config", "tag_extra",
    "build_target_config", "external_repo_config", "external_repo_data", "host_config",
    "host_channels", "tag_external_repos", "tag_listing", "tag_packages",
    "tag_package_owners", "group_config", "group_req_listing", "group_package_listing",
)


def koji_time(ts: float | None) -> str | None:
    """
    A time as Koji sends it: C{isoformat(' ')} of an aware UTC datetime.
    """
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(" ")


def _sort_rows(rows: list[dict[str, Any]], query_opts: dict[str, Any] | None) -> Any:
    opts = query_opts or {}
    order = opts.get("order")
    if order:
        for key in reversed(str(order).split(",")):
            reverse = key.startswith("-")
            key = key.lstrip("-")
            rows.sort(key=lambda r: (r.get(key) is None, r.get(key)), reverse=reverse)
    if opts.get("countOnly"):
        return len(rows)
    offset = int(opts.get("offset") or 0)
    rows = rows[offset:]
    if opts.get("limit") is not None:
        rows = rows[: int(opts["limit"])]
    return rows


class FakeKoji:
    """
    A Koji hub's state and the read calls a poller makes.

    Change it with L{start_build}, L{finish_build}, L{import_build},
    L{tag_build}, L{untag_build}, L{scratch_build}, L{child_task}, L{set_task_state},
    L{new_repo} and L{repo_state}; each advances the hub's clock by C{step}
    seconds and allocates events the way the real hub does (builds and tasks
    change without events; tags and repos get one).
    """

    def __init__(self, step: float = 1.0) -> None:
        last = koji_sample("getLastEvent.json")
        # The recorded tasks are newer than the recorded last event: the
        # hub's clock starts after everything in the samples.
        self.now: float = 1740090000.0  # 2025-02-20 22:20 UTC
        self.step = step
        self.events: list[tuple[int, float]] = [(int(last["id"]), self.now)]
        self.users = {1: "mikem", 2: "kojiadmin", 3: "bodhi", 4: "releng", 3199: "koschei"}
        self.tags: dict[int, str] = {2: "f24", 13: "destination", 6446: "f31-updates-pending",
                                     18677: "f33-build", 10321: "epel8-signing-pending"}
        self.builds: dict[int, dict[str, Any]] = {}
        self.tasks: dict[int, dict[str, Any]] = {}
        self.tag_listing: list[dict[str, Any]] = []
        self.repos: dict[int, dict[str, Any]] = {}
        self.next_build = 575
        self.next_task = 14461
        self.next_repo = 2581
        self.fail_methods: dict[str, int] = {}
        self.hosts: dict[int, str] = {1: "buildvm-x86-01.iad2.fedoraproject.org"}

        build = koji_sample("getBuild.json")
        self.builds[build["build_id"]] = build
        task = koji_sample("getTaskInfo_build.json")
        task.update(owner_name="mikem", owner_type=0, result=None)
        self.tasks[task["id"]] = task
        for listed in koji_sample("listTasks_decode.json"):
            self.tasks[listed["id"]] = listed
        for row in koji_sample("queryHistory_tag_listing.json")["tag_listing"]:
            row = {k: v for k, v in row.items() if not k.startswith("_")}
            self.tag_listing.append(row)
        # The newest repo of the hub, made by a finished newRepo task.
        self.repos[2580] = {
            "id": 2580, "state": REPO_READY, "create_event": 497600,
            "create_ts": 1720035000.0, "creation_time": koji_time(1720035000.0),
            "tag_id": 2, "tag_name": "f24", "dist": False, "task_id": 14329,
        }
        self.tasks[14329] = self._task_row(14329, "newRepo", ["f24", {}], CLOSED, owner=2,
                                          created=1720034990.0)
        self.tasks[14329]["result"] = [2580, 497600]

        self.server = FakeXMLRPCServer(
            {
                "getAPIVersion": lambda: 1,
                "getKojiVersion": lambda: "1.35.0",
                "getLastEvent": self.getLastEvent,
                "getEvent": self.getEvent,
                "queryHistory": self.queryHistory,
                "listBuilds": self.listBuilds,
                "listTasks": self.listTasks,
                "getBuild": self.getBuild,
                "getTaskInfo": self.getTaskInfo,
                "repoInfo": self.repoInfo,
                "getTag": self.getTag,
                "getUser": self.getUser,
                "getHost": self.getHost,
            },
            multicall_names=("multiCall", "system.multicall"),
        )

    # --- the model --------------------------------------------------------

    @property
    def last_event(self) -> int:
        return self.events[-1][0]

    def tick(self) -> float:
        self.now += self.step
        return self.now

    def event(self) -> int:
        """
        Allocate a new event at the current time.
        """
        self.events.append((self.events[-1][0] + 1, self.now))
        return self.events[-1][0]

    def _task_row(self, task_id: int, method: str, request: list[Any], state: int, owner: int = 1,
                  created: float | None = None, parent: int | None = None,
                  arch: str = "noarch") -> dict[str, Any]:
        created = self.now if created is None else created
        started = created if state not in (FREE, ASSIGNED) else None
        finished = created if state in (CLOSED, TASK_CANCELED, TASK_FAILED) else None
        return {
            "arch": arch, "awaited": None, "channel_id": 1, "host_id": 1 if started else None,
            "id": task_id, "label": None, "method": method, "owner": owner,
            "owner_name": self.users.get(owner, "user%d" % owner), "owner_type": 0,
            "parent": parent, "priority": 20, "request": request, "result": None,
            "state": state, "waiting": None, "weight": 0.2,
            "create_time": koji_time(created), "create_ts": created,
            "start_time": koji_time(started), "start_ts": started,
            "completion_time": koji_time(finished), "completion_ts": finished,
        }

    def _new_task(self, method: str, request: list[Any], state: int, owner: int = 1) -> int:
        task_id = self.next_task
        self.next_task += 1
        self.tasks[task_id] = self._task_row(task_id, method, request, state, owner)
        return task_id

    def set_task_state(self, task_id: int, state: int, result: Any = None) -> None:
        """
        Move a task to C{state} (no event: tasks are not versioned).
        """
        now = self.tick()
        task = self.tasks[task_id]
        task["state"] = state
        if state == OPEN and task["start_ts"] is None:
            task.update(start_ts=now, start_time=koji_time(now), host_id=1)
        if state in (CLOSED, TASK_CANCELED, TASK_FAILED):
            task.update(completion_ts=now, completion_time=koji_time(now), result=result)

    def start_build(self, name: str, version: str, release: str, owner: int = 1,
                    target: str = "f24") -> tuple[int, int]:
        """
        Submit a build: a C{build} task (OPEN) and a BUILDING build.

        @return: the build id and the task id.
        """
        self.tick()
        source = f"git+https://src.example.org/rpms/{name}.git#0123456789abcdef"
        task_id = self._new_task("build", [source, target, {}], OPEN, owner)
        build_id = self.next_build
        self.next_build += 1
        event = self.event()
        template = koji_sample("getBuild.json")
        template.update(
            id=build_id, build_id=build_id, name=name, package_name=name, version=version,
            release=release, nvr=f"{name}-{version}-{release}", state=BUILDING, task_id=task_id,
            owner_id=owner, owner_name=self.users.get(owner, "user%d" % owner),
            creation_event_id=event, creation_ts=self.now, creation_time=koji_time(self.now),
            start_ts=self.now, start_time=koji_time(self.now), completion_ts=None,
            completion_time=None, promotion_ts=None, promotion_time=None, promoter_id=None,
            promoter_name=None, source=source, extra={"source": {"original_url": source}},
            epoch=None,
        )
        self.builds[build_id] = template
        return build_id, task_id

    def finish_build(self, build_id: int, state: int = COMPLETE) -> None:
        """
        End a build (and its task) in C{state}.
        """
        now = self.tick()
        build = self.builds[build_id]
        build.update(state=state, completion_ts=now, completion_time=koji_time(now))
        if build["task_id"] is not None:
            task_state = {COMPLETE: CLOSED, FAILED: TASK_FAILED, CANCELED: TASK_CANCELED}[state]
            self.set_task_state(build["task_id"], task_state)

    def import_build(self, name: str, version: str, release: str, owner: int = 1) -> int:
        """
        Import a build: it is COMPLETE at once and has no task.
        """
        build_id, task_id = self.start_build(name, version, release, owner)
        del self.tasks[task_id]
        self.builds[build_id].update(task_id=None, state=COMPLETE, completion_ts=self.now,
                                     completion_time=koji_time(self.now))
        return build_id

    def tag_build(self, build_id: int, tag: str, user: int = 3) -> int:
        """
        Tag a build; returns the event.
        """
        self.tick()
        tag_id = next(i for i, n in self.tags.items() if n == tag)
        build = self.builds[build_id]
        event = self.event()
        self.tag_listing.append({
            "active": True, "build.state": build["state"], "build_id": build_id,
            "create_event": event, "create_ts": self.now, "creator_id": user,
            "creator_name": self.users[user], "epoch": build["epoch"], "name": build["name"],
            "release": build["release"], "revoke_event": None, "revoke_ts": None,
            "revoker_id": None, "revoker_name": None, "tag.name": tag, "tag_id": tag_id,
            "version": build["version"],
        })
        return event

    def untag_build(self, build_id: int, tag: str, user: int = 3) -> int:
        """
        Untag a build; returns the event.
        """
        self.tick()
        row = next(r for r in self.tag_listing
                   if r["build_id"] == build_id and r["tag.name"] == tag and r["active"])
        event = self.event()
        row.update(active=None, revoke_event=event, revoke_ts=self.now, revoker_id=user,
                   revoker_name=self.users[user])
        return event

    def scratch_build(self, srpm: str, owner: int = 3199, target: str = "f24") -> int:
        """
        Submit a scratch build: a FREE parent C{build} task.
        """
        self.tick()
        return self._new_task("build", [srpm, target, {"scratch": True}], FREE, owner)

    def child_task(self, parent: int, arch: str = "x86_64") -> int:
        """
        Give a parent task a FREE C{buildArch} child task.
        """
        self.tick()
        task_id = self._new_task("buildArch", [self.tasks[parent]["request"][0], 1, arch], FREE,
                                 self.tasks[parent]["owner"])
        self.tasks[task_id].update(parent=parent, arch=arch)
        return task_id

    def new_repo(self, tag: str) -> int:
        """
        Start regenerating a tag's repo: a newRepo task and an INIT repo.
        """
        self.tick()
        tag_id = next(i for i, n in self.tags.items() if n == tag)
        task_id = self._new_task("newRepo", [tag, {}], OPEN, 2)
        repo_id = self.next_repo
        self.next_repo += 1
        event = self.event()
        self.repos[repo_id] = {
            "id": repo_id, "state": REPO_INIT, "create_event": event, "create_ts": self.now,
            "creation_time": koji_time(self.now), "tag_id": tag_id, "tag_name": tag,
            "dist": False, "task_id": task_id,
        }
        return repo_id

    def repo_state(self, repo_id: int, state: int) -> None:
        """
        Move a repo to C{state}; READY closes its task.
        """
        self.tick()
        repo = self.repos[repo_id]
        repo["state"] = state
        if state == REPO_READY:
            self.set_task_state(repo["task_id"], CLOSED, [repo_id, repo["create_event"]])

    # --- the calls --------------------------------------------------------

    def _maybe_fail(self, method: str) -> None:
        if self.fail_methods.get(method):
            self.fail_methods[method] -= 1
            raise xmlrpc.client.Fault(1000, f"GenericError: {method} failed on purpose")

    def getLastEvent(self, before: float | None = None, strict: bool = True) -> dict[str, Any]:
        self._maybe_fail("getLastEvent")
        candidates = [e for e in self.events if before is None or e[1] < before]
        event_id, ts = candidates[-1]
        return {"id": event_id, "ts": ts}

    def getEvent(self, event_id: int, strict: bool = True) -> dict[str, Any] | None:
        for candidate, ts in self.events:
            if candidate == event_id:
                return {"id": candidate, "ts": ts}
        if strict:
            raise xmlrpc.client.Fault(1000, f"GenericError: No such event: {event_id}")
        return None

    def queryHistory(self, tables: list[str] | None = None, afterEvent: int | None = None,
                     beforeEvent: int | None = None, queryOpts: dict[str, Any] | None = None,
                     **filters: Any) -> dict[str, Any]:
        self._maybe_fail("queryHistory")
        for table in tables or []:
            if table not in HISTORY_TABLES:
                raise xmlrpc.client.Fault(1000, f"GenericError: No such history table: {table}")
        result: dict[str, Any] = {}
        for table in tables or list(HISTORY_TABLES):
            if table != "tag_listing":
                result[table] = []
                continue
            rows = []
            for row in self.tag_listing:
                created, revoked = row["create_event"], row["revoke_event"]
                out = dict(row)
                if afterEvent is not None:
                    if not (created > afterEvent or (revoked is not None and revoked > afterEvent)):
                        continue
                    out["_created_after_event"] = created > afterEvent
                    out["_revoked_after_event"] = None if revoked is None else revoked > afterEvent
                if beforeEvent is not None:
                    if not (created < beforeEvent or (revoked is not None and revoked < beforeEvent)):
                        continue
                    out["_created_before_event"] = created < beforeEvent
                    out["_revoked_before_event"] = (None if revoked is None
                                                    else revoked < beforeEvent)
                if "tag" in filters and filters["tag"] not in (row["tag_id"], row["tag.name"]):
                    continue
                rows.append(out)
            # The hub does not order rows unless asked: make sure nobody relies on it.
            rows.reverse()
            result[table] = _sort_rows(rows, queryOpts)
        return result

    def listBuilds(self, packageID: int | None = None, userID: int | None = None,
                   taskID: int | None = None, prefix: str | None = None, state: int | None = None,
                   createdBefore: float | None = None, createdAfter: float | None = None,
                   completeBefore: float | None = None, completeAfter: float | None = None,
                   type: str | None = None, queryOpts: dict[str, Any] | None = None,
                   **other: Any) -> Any:
        self._maybe_fail("listBuilds")
        rows = []
        for build in self.builds.values():
            if state is not None and build["state"] != state:
                continue
            if taskID is not None and build["task_id"] != taskID:
                continue
            created = build["creation_ts"]
            completed = build["completion_ts"]
            if createdAfter is not None and not created > createdAfter:
                continue
            if createdBefore is not None and not created < createdBefore:
                continue
            if completeAfter is not None and not (completed is not None and completed > completeAfter):
                continue
            if completeBefore is not None and not (completed is not None
                                                   and completed < completeBefore):
                continue
            row = {k: v for k, v in build.items() if k not in ("id", "cg_id", "cg_name")}
            rows.append(row)
        return _sort_rows(rows, queryOpts)

    def listTasks(self, opts: dict[str, Any] | None = None,
                  queryOpts: dict[str, Any] | None = None) -> Any:
        self._maybe_fail("listTasks")
        opts = opts or {}
        rows = []
        for task in self.tasks.values():
            if "parent" in opts:
                if opts["parent"] is None and task["parent"] is not None:
                    continue
                if opts["parent"] is not None and task["parent"] != opts["parent"]:
                    continue
            if "method" in opts and task["method"] != opts["method"]:
                continue
            if "state" in opts and task["state"] not in opts["state"]:
                continue
            bounds = (("createdAfter", "create_ts", 1), ("createdBefore", "create_ts", -1),
                      ("startedAfter", "start_ts", 1), ("startedBefore", "start_ts", -1),
                      ("completeAfter", "completion_ts", 1), ("completeBefore", "completion_ts", -1))
            keep = True
            for key, field, sign in bounds:
                if opts.get(key) is None:
                    continue
                value = task[field]
                if value is None or not (value - opts[key]) * sign > 0:
                    keep = False
            if not keep:
                continue
            row = copy.deepcopy(task)
            if not opts.get("decode"):
                row["request"] = xmlrpc.client.dumps(tuple(row["request"]), allow_none=True)
                row["result"] = xmlrpc.client.dumps((row["result"],), allow_none=True)
            else:
                # Decoded results come wrapped like XML-RPC params: [result].
                row["result"] = [row["result"]]
            rows.append(row)
        return _sort_rows(rows, queryOpts)

    def getBuild(self, buildInfo: Any, strict: bool = False) -> dict[str, Any] | None:
        self._maybe_fail("getBuild")
        build = self.builds.get(buildInfo) if isinstance(buildInfo, int) else next(
            (b for b in self.builds.values() if b["nvr"] == buildInfo), None)
        if build is None and strict:
            raise xmlrpc.client.Fault(1000, f"GenericError: No such build: {buildInfo!r}")
        return copy.deepcopy(build)

    def getHost(self, host: int | str, strict: bool = False) -> dict[str, Any] | None:
        self._maybe_fail("getHost")
        name = self.hosts.get(host) if isinstance(host, int) else None
        if name is None:
            if strict:
                raise xmlrpc.client.Fault(1000, f"GenericError: No such host: {host!r}")
            return None
        return {"id": host, "name": name, "arches": "x86_64", "enabled": True, "ready": True}

    def getTaskInfo(self, task_id: int, request: bool = False,
                    strict: bool = False) -> dict[str, Any] | None:
        self._maybe_fail("getTaskInfo")
        task = self.tasks.get(task_id)
        if task is None:
            if strict:
                raise xmlrpc.client.Fault(1000, f"GenericError: No such task: {task_id}")
            return None
        row = {k: v for k, v in task.items() if k not in ("owner_name", "owner_type", "result")}
        if not request:
            del row["request"]
        return copy.deepcopy(row)

    def repoInfo(self, repo_id: int, strict: bool = False) -> dict[str, Any] | None:
        self._maybe_fail("repoInfo")
        repo = self.repos.get(repo_id)
        if repo is None and strict:
            raise xmlrpc.client.Fault(1000, f"GenericError: No such repo: {repo_id}")
        return copy.deepcopy(repo)

    def getTag(self, tagInfo: Any, strict: bool = False) -> dict[str, Any] | None:
        for tag_id, name in self.tags.items():
            if tagInfo in (tag_id, name):
                return {"id": tag_id, "name": name, "arches": "x86_64", "locked": False}
        if strict:
            raise xmlrpc.client.Fault(1003, f"TagError: No such tag: {tagInfo!r}")
        return None

    def getUser(self, userInfo: Any = None, strict: bool = False) -> dict[str, Any] | None:
        for user_id, name in self.users.items():
            if userInfo in (user_id, name):
                return {"id": user_id, "name": name, "status": 0, "usertype": 0}
        return None


# --- Bugzilla -----------------------------------------------------------


def bz_time(ts: float) -> datetime:
    """
    A time as Bugzilla's XML-RPC sends it: a naive UTC C{dateTime.iso8601}.
    """
    return datetime.fromtimestamp(int(ts), timezone.utc).replace(tzinfo=None)


def _bz_epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc).timestamp()
    if isinstance(value, xmlrpc.client.DateTime):
        return datetime.strptime(value.value, "%Y%m%dT%H:%M:%S").replace(
            tzinfo=timezone.utc).timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        # A time a test broke on purpose: such rows always come along.
        return math.inf


class FakeBugzilla:
    """
    A Bugzilla (5.0, Red Hat flavour: component and version are lists) with
    the web service calls the Bugzilla poller makes.

    Change it with L{new_bug}, L{change} and L{add_comment}; each advances
    its clock by C{step} seconds.
    """

    def __init__(self, api_key: str | None = None, step: float = 60.0) -> None:
        self.now = 1735725600.0  # 2025-01-01 10:00:00 UTC
        self.step = step
        self.api_key = api_key
        self.bugs: dict[int, dict[str, Any]] = {}
        self.history: dict[int, list[dict[str, Any]]] = {}
        self.comments: dict[int, list[dict[str, Any]]] = {}
        self.next_bug = 2254321
        self.next_comment = 17400001
        self.users = {
            "packager.reporter@example.org": (410, "Pat Reporter"),
            "maintainer@example.org": (411, "Max Maintainer"),
            "triage@example.org": (412, "Tri Age"),
            "nobody@fedoraproject.org": (1, "Nobody's working on this"),
        }
        self.search_calls: list[dict[str, Any]] = []
        #: Bugzilla's C{max_search_results}: a C{Bug.search} limit above it
        #: (or none) gives this many bugs, silently.
        self.max_search_results: int | None = None
        self.server = FakeXMLRPCServer({
            "Bugzilla.version": lambda *a: {"version": "5.0.4.rh100"},
            "Bugzilla.time": self.time,
            "Bug.search": self.search,
            "Bug.history": self.get_history,
            "Bug.comments": self.get_comments,
            "Bug.get": self.get,
        })

    def tick(self) -> float:
        self.now += self.step
        return self.now

    def _user(self, login: str) -> dict[str, Any]:
        user_id, real_name = self.users.get(login, (999, ""))
        return {"id": user_id, "real_name": real_name, "name": login, "email": login}

    def _auth(self, params: dict[str, Any]) -> None:
        if self.api_key is not None and params.get("Bugzilla_api_key") != self.api_key:
            raise xmlrpc.client.Fault(410, "You must log in before using this part of Red Hat "
                                           "Bugzilla.")

    def new_bug(self, product: str = "Fedora", component: str = "python-requests",
                summary: str = "requests fails with SSLError on redirects",
                reporter: str = "packager.reporter@example.org",
                assignee: str = "maintainer@example.org", description: str = "Steps...",
                private: bool = False) -> int:
        """
        File a bug (with its description, comment 0).
        """
        now = self.tick()
        bug_id = self.next_bug
        self.next_bug += 1
        self.bugs[bug_id] = {
            "id": bug_id, "alias": [], "assigned_to": assignee,
            "assigned_to_detail": self._user(assignee), "blocks": [], "cc": [reporter],
            "classification": "Fedora", "component": [component], "creation_time": bz_time(now),
            "creator": reporter, "creator_detail": self._user(reporter), "depends_on": [],
            "flags": [], "groups": ["redhat"] if private else [], "is_open": True,
            "keywords": [], "last_change_time": bz_time(now), "op_sys": "Linux",
            "platform": "x86_64", "priority": "unspecified", "product": product,
            "qa_contact": "extras-qa@fedoraproject.org",
            "qa_contact_detail": self._user("extras-qa@fedoraproject.org"),
            "resolution": "", "severity": "medium", "status": "NEW", "summary": summary,
            "target_milestone": "---", "url": "", "version": ["41"], "whiteboard": "",
        }
        self.history[bug_id] = []
        self.comments[bug_id] = []
        self._comment(bug_id, reporter, description, False, now)
        return bug_id

    def _comment(self, bug_id: int, who: str, text: str, private: bool, now: float) -> None:
        comment_id = self.next_comment
        self.next_comment += 1
        self.comments[bug_id].append({
            "id": comment_id, "bug_id": bug_id, "attachment_id": None,
            "count": len(self.comments[bug_id]), "text": text, "creator": who, "author": who,
            "time": bz_time(now), "creation_time": bz_time(now), "is_private": private,
            "tags": [],
        })

    def change(self, bug_id: int, who: str, **fields: Any) -> None:
        """
        Change fields of a bug (one history entry).
        """
        now = self.tick()
        bug = self.bugs[bug_id]
        changes = []
        for name, value in fields.items():
            old = bug.get(name)
            bug[name] = value
            text_old = ", ".join(old) if isinstance(old, list) else str(old or "")
            text_new = ", ".join(value) if isinstance(value, list) else str(value or "")
            changes.append({"field_name": name, "removed": text_old, "added": text_new})
        bug["last_change_time"] = bz_time(now)
        self.history[bug_id].append({"when": bz_time(now), "who": who, "changes": changes})

    def add_comment(self, bug_id: int, who: str, text: str, private: bool = False) -> None:
        """
        Comment on a bug.
        """
        now = self.tick()
        self._comment(bug_id, who, text, private, now)
        self.bugs[bug_id]["last_change_time"] = bz_time(now)

    def time(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._auth(params or {})
        return {"db_time": bz_time(self.now), "web_time": bz_time(self.now), "tz_name": "UTC",
                "tz_offset": "+0000"}

    def search(self, params: dict[str, Any]) -> dict[str, Any]:
        self._auth(params)
        self.search_calls.append(params)
        since = params.get("last_change_time")
        products = params.get("product")
        components = params.get("component")
        found = []
        for bug in sorted(self.bugs.values(), key=lambda b: b["id"]):
            if since is not None and _bz_epoch(bug["last_change_time"]) < _bz_epoch(since):
                continue
            if products and bug["product"] not in products:
                continue
            if components and not set(bug["component"]) & set(components):
                continue
            found.append(copy.deepcopy(bug))
        if params.get("order") != "bug_id":
            # Bugzilla sorts only when asked to; the database's own order
            # (PostgreSQL's, say) is anything.
            found.reverse()
        offset = int(params.get("offset") or 0)
        found = found[offset:]
        limit = int(params.get("limit") or 0)
        cap = self.max_search_results
        if cap is not None and (limit == 0 or limit > cap):
            limit = cap
        if limit:
            found = found[:limit]
        return {"bugs": found, "faults": []}

    def get(self, params: dict[str, Any]) -> dict[str, Any]:
        self._auth(params)
        return {"bugs": [copy.deepcopy(self.bugs[i]) for i in params["ids"] if i in self.bugs],
                "faults": []}

    def get_history(self, params: dict[str, Any]) -> dict[str, Any]:
        self._auth(params)
        since = params.get("new_since")
        bugs = []
        for bug_id in params["ids"]:
            entries = [copy.deepcopy(h) for h in self.history.get(bug_id, [])
                       if since is None or _bz_epoch(h["when"]) > _bz_epoch(since)]
            bugs.append({"id": bug_id, "alias": [], "history": entries})
        return {"bugs": bugs}

    def get_comments(self, params: dict[str, Any]) -> dict[str, Any]:
        self._auth(params)
        since = params.get("new_since")
        bugs = {}
        for bug_id in params["ids"]:
            entries = [copy.deepcopy(c) for c in self.comments.get(bug_id, [])
                       if since is None or _bz_epoch(c["creation_time"]) > _bz_epoch(since)]
            bugs[str(bug_id)] = {"comments": entries}
        return {"bugs": bugs, "comments": {}}


# --- without sockets ----------------------------------------------------


@implementer(IXMLRPCCaller)
class DirectCaller:
    """
    An L{IXMLRPCCaller} that calls a fake server's handlers in-process,
    marshalling arguments and results through XML-RPC on the way (so tuples
    become lists, ints beyond 32 bits travel as C{<i8>}), for fast unit
    tests of sources.  Faults become L{XMLRPCFault}, as the real client has
    them.

    @ivar requests: How many requests a real client would have made.
    """

    def __init__(self, server: FakeXMLRPCServer, url: str = "https://hub.example/kojihub",
                 multicall_method: str = "system.multicall") -> None:
        self.server = server
        self.url = url
        self.multicall_method = multicall_method
        self.requests = 0
        self.closed = 0
        self.fail_next: list[Exception] = []

    def _round_trip(self, method: str, params: tuple[Any, ...]) -> Any:
        self.requests += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        decoded, _ = xmlrpc.client.loads(encode_call(method, params), use_builtin_types=True)
        try:
            result = self.server.dispatch(method, decoded)
        except xmlrpc.client.Fault as fault:
            raise XMLRPCFault(self.url, method, fault.faultCode, fault.faultString) from None
        values, _ = xmlrpc.client.loads(response_xml(result), use_builtin_types=True)
        return values[0]

    def call(self, method: str, *params: Any) -> Deferred[Any]:
        try:
            return succeed(self._round_trip(method, params))
        except Exception as e:
            return fail(e)

    def multicall(self, calls: Sequence[Call], batch_size: int = 100) -> Deferred[list[Any]]:
        results: list[Any] = []
        try:
            for i in range(0, len(calls), batch_size):
                batch = calls[i : i + batch_size]
                answers = self._round_trip(
                    self.multicall_method,
                    ([{"methodName": c.method, "params": list(c.params)} for c in batch],))
                for c, answer in zip(batch, answers):
                    if isinstance(answer, dict):
                        results.append(XMLRPCFault(self.url, c.method, answer["faultCode"],
                                                   answer["faultString"]))
                    else:
                        results.append(answer[0])
        except Exception as e:
            return fail(e)
        return succeed(results)

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)


# --- checking messages against the published schema packages -----------


def schema_names() -> set[str]:
    """
    The schema names installed packages register for fedora-messaging
    (entry points of the group C{fedora.messages}).
    """
    return {ep.name for ep in importlib.metadata.entry_points(group="fedora.messages")}


def check_with_schema_package(message: Message) -> Any:
    """
    Read C{message} the way a fedora-messaging consumer does (its serialized
    form, the class named by its C{fedora_messaging_schema} header) and
    validate headers and body with that class.

    @return: the fedora-messaging message object.
    @raise AssertionError: when the schema name is not installed.
    @raise jsonschema.ValidationError: when the message does not validate.
    """
    from fedora_messaging import message as fm

    if message.schema not in schema_names():
        raise AssertionError(f"schema {message.schema!r} is not an installed fedora.messages name")
    loaded = fm.loads(dump_line(message))[0]
    if type(loaded) is fm.Message:
        raise AssertionError(f"fedora-messaging found no class for {message.schema!r}")
    loaded.validate()
    return loaded
