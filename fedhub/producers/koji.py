"""
The Koji producer: polls a Koji hub over XML-RPC and publishes what Fedora's
Koji message plugin would have, for hubs that do not run it.

Topics and bodies follow C{koji-fedoramessaging} so existing consumers and
the C{koji-fedoramessaging-messages} schemas work unchanged:

  - C{buildsys.tag} / C{buildsys.untag}: from C{queryHistory} of the
    C{tag_listing} table, by Koji event id (Koji's monotonic clock);
  - C{buildsys.build.state.change}: from C{listBuilds} with C{createdAfter}
    and C{completeAfter} (builds are not versioned: no events);
  - C{buildsys.task.state.change}: from C{listTasks} (created, started,
    completed), by default only for scratch builds' parent tasks as in Fedora;
  - C{buildsys.repo.init} / C{buildsys.repo.done}: by looking at new repo
    ids (they are allocated in sequence) and at repos still being made;
    while catching up, a repo waits for the poll that reads its event.

One poll is one C{getLastEvent} call when nothing changed, plus one
C{multiCall} for the queries and at most one more for details (build owners,
build tasks).  History is read in windows of C{event_step} events, so a hub
far ahead (a long outage, C{backfill_from_event}) is caught up in bounded
steps, polling again at once while behind.

What can go wrong in Koji itself is handled by overlap: a transaction that
commits after a later event was already visible, or a build that completes
with a time just before the last poll.  Each poll reads a little history
(C{event_overlap} events) and time (C{time_overlap} seconds) again, and
drops what it already published, remembered in the cursor.

Message ids are derived from the hub URL and the event (UUID5), so the
duplicates a crash may cause carry the same ids as the originals.
"""

from __future__ import annotations

import copy
import math
import posixpath
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from fedhub.config import REQUIRED, Option
from fedhub.errors import FedhubError, MessageError
from fedhub.interfaces import IProducerPlugin
from fedhub.logs import HubLogger
from fedhub.message import DEBUG, INFO, Message
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
from fedhub.xmlrpc import (
    Call,
    ResponseTooLarge,
    XMLRPCCaller,
    XMLRPCClient,
    display_url,
    unwrap,
)

#: At most how many build hosts' names a poller remembers (a hub has a few
#: hundred).
MAX_HOST_NAMES = 10_000

BUILD_STATES = ("BUILDING", "COMPLETE", "DELETED", "FAILED", "CANCELED")
TASK_STATES = ("FREE", "OPEN", "CLOSED", "CANCELED", "ASSIGNED", "FAILED")
BUILDING = 0
FINAL_BUILD_STATES = frozenset({1, 2, 3, 4})
FINAL_TASK_STATES = frozenset({2, 3, 5})
TASK_CLOSED = 2
REPO_INIT, REPO_READY, REPO_EXPIRED, REPO_DELETED = 0, 1, 2, 3
#: The states of a repo that was ready: Koji expires only ready repos (and
#: deletes only expired ones), so a repo followed while it was being made
#: and found in one of these finished, whatever happened since.
_WAS_READY = frozenset({REPO_READY, REPO_EXPIRED, REPO_DELETED})

#: The schema names (entry points of C{koji-fedoramessaging-messages}) by topic suffix.
SCHEMAS: Mapping[str, str] = {
    "buildsys.build.state.change": "koji_fedoramessaging.build.BuildStateChangeV1",
    "buildsys.tag": "koji_fedoramessaging.tag.TagV1",
    "buildsys.untag": "koji_fedoramessaging.tag.UntagV1",
    "buildsys.task.state.change": "koji_fedoramessaging.task.TaskStateChangeV1",
    "buildsys.repo.init": "koji_fedoramessaging.repo.InitV1",
    "buildsys.repo.done": "koji_fedoramessaging.repo.DoneV1",
}

#: Which parent tasks get C{task.state.change} messages.
TASK_MODES = ("scratch", "parents", "all", "none")
#: The choices of C{tasks} that publish tasks, narrowest first: each
#: publishes the tasks of the ones before it too (see L{_task_kind}).
_TASK_CHOICES = ("scratch", "parents", "all")

_NAMESPACE = uuid.UUID("6f1c9d8e-3b0a-5d7e-9a2c-4e8f1b6d0c35")
# The states the "created" and "started" task queries ask for.
_UNFINISHED = {"created": [0, 1, 4], "started": [1]}

#: The most rows a time stream asks for in one query, when a page of
#: C{page_size} rows held nothing but rows of one time (see
#: L{KojiSource._advance}).
MAX_PAGE = 10_000
# How many entries the cursor keeps of builds and tasks not finished yet.
_MAX_OPEN = 20000
# How many repos being made the cursor follows (each is looked at every
# poll): the newest; an older one past that gets no repo.done.
MAX_PENDING_REPOS = 1000


class KojiError(FedhubError):
    """
    The hub answered something the poller can not use.

    @ivar reason: What was wrong.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def kwargs(**values: Any) -> dict[str, Any]:
    """
    Koji's keyword arguments: one trailing struct marked C{__starstar}; keys
    whose value is C{None} are left out.
    """
    params = {k: v for k, v in values.items() if v is not None}
    params["__starstar"] = True
    return params


def _number(value: Any) -> float | None:
    """
    A finite number the hub sent, or C{None} for anything else (a missing
    value, or a broken hub's string where a number belongs).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return number
    return None


def iso_time(ts: float | None) -> str | None:
    """
    An epoch time as koji-fedoramessaging writes it: ISO 8601, UTC offset.
    """
    if ts is None:
        return None
    return datetime.fromtimestamp(float(ts), timezone.utc).isoformat()


@dataclass(frozen=True)
class KojiSettings:
    """
    What a Koji poller polls and how.

    @ivar hub_url: The hub's XML-RPC endpoint.
    @ivar web_url: koji-web's base URL, for the C{url} fields.
    @ivar base_url: The hub's site, for the C{base_url} fields.
    @ivar files_base_url: Where task results are served (C{.../work}).
    @ivar instance: The C{instance} field (C{primary} or a secondary hub).
    @ivar tags: Publish tag and untag events.
    @ivar builds: Publish build state changes.
    @ivar tasks: Which parent tasks' state changes to publish: C{scratch}
        (as Fedora does), C{parents}, C{all} (children too) or C{none}.
    @ivar repos: Publish repo init and done events.
    @ivar backfill_from_event: On first start, begin after this event instead
        of the hub's current one (every kind, repos included).
    @ivar event_step: At most this many events of history per poll.
    @ivar event_overlap: Events read again each poll (late commits).
    @ivar time_overlap: Seconds of builds and tasks read again each poll.
    @ivar page_size: At most this many rows per query.
    @ivar batch_size: At most this many calls per multiCall request.
    @ivar repo_probe: How many repo ids past the newest known one to look at
        (twice as many each poll, up to C{page_size}, while all were repos).
    """

    hub_url: str
    web_url: str
    base_url: str
    files_base_url: str
    instance: str = "primary"
    tags: bool = True
    builds: bool = True
    tasks: str = "scratch"
    repos: bool = True
    backfill_from_event: int | None = None
    event_step: int = 1000
    event_overlap: int = 20
    time_overlap: float = 120.0
    page_size: int = 500
    batch_size: int = 100
    repo_probe: int = 10

    @classmethod
    def for_hub(cls, hub_url: str, **values: Any) -> KojiSettings:
        """
        Settings for C{hub_url}, the URLs not given derived from it the way a
        default Koji install lays them out (C{/kojihub}, C{/koji},
        C{/kojifiles/work}).
        """
        parts = urlsplit(hub_url)
        site = f"{parts.scheme}://{parts.netloc}"
        path = parts.path.rstrip("/")
        web = site + (path[: -len("hub")] if path.endswith("/kojihub") else "/koji")
        values = {k: v for k, v in values.items() if v is not None or k == "backfill_from_event"}
        values.setdefault("web_url", web)
        values.setdefault("base_url", site)
        values.setdefault("files_base_url", site + "/kojifiles/work")
        return cls(hub_url=hub_url, **values)


class _SeenWindow:
    """
    Keys of what was published, each with its position (an event id or a
    time), kept while the position is within the overlap that is read again.
    """

    def __init__(self, entries: Mapping[str, float] | None) -> None:
        self.entries: dict[str, float] = dict(entries or {})

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add(self, key: str, position: float) -> None:
        self.entries[key] = position

    def prune(self, below: float) -> dict[str, float]:
        return {k: v for k, v in self.entries.items() if v >= below}


def _cap(mapping: dict[str, Any], limit: int = _MAX_OPEN) -> dict[str, Any]:
    """
    Keep the C{limit} highest numeric keys of C{mapping}.
    """
    if len(mapping) <= limit:
        return mapping
    keep = sorted(mapping, key=lambda k: int(k))[-limit:]
    return {k: mapping[k] for k in keep}


def _time_streams(names: Sequence[str], ts: float) -> dict[str, Any]:
    """
    The state of builds or tasks starting at C{ts}: each of their time
    streams (C{names}) there, nothing paged, seen or followed.
    """
    return {**{name: ts for name in names}, "paging": [], "seen": {}, "open": {}}


def _floor(state: Mapping[str, Any], floor_ts: float) -> float:
    """
    The time up to which builds or tasks are not published: the first
    start's (C{floor_ts}), or the later one at which they were switched on.
    """
    return max(floor_ts, _number(state.get("floor")) or floor_ts)


def _task_kind(task: Mapping[str, Any]) -> str:
    """
    The narrowest choice of C{tasks} that publishes C{task}'s state changes:
    C{scratch} for the parent task of a scratch build, C{parents} for any
    other parent task, C{all} for a child task.
    """
    if task.get("parent") is not None:
        return "all"
    request = task.get("request")
    if (isinstance(request, list) and bool(request) and isinstance(request[-1], dict)
            and request[-1].get("scratch") is True):
        return "scratch"
    return "parents"


def _task_kinds(choice: str) -> tuple[str, ...]:
    """
    The kinds of task (see L{_task_kind}) that a choice of C{tasks}
    publishes: those of the narrower choices too, none for C{none}.
    """
    if choice not in _TASK_CHOICES:
        return ()
    return _TASK_CHOICES[:_TASK_CHOICES.index(choice) + 1]


def _result(task: Mapping[str, Any]) -> Any:
    """
    A task result as koji-fedoramessaging's schema takes it: C{null}, an
    object or a string.  (C{listTasks(decode=True)} wraps a result like
    XML-RPC parameters: C{[result]}.)
    """
    result = task.get("result")
    if isinstance(result, list) and len(result) == 1:
        result = result[0]
    if result is None or isinstance(result, (dict, str)):
        return result
    import json

    return json.dumps(result, default=str)


@implementer(IPollSource)
class KojiSource:
    """
    Turns a Koji hub's history into bus messages; see the module docstring.
    """

    log = HubLogger()

    def __init__(self, name: str, client: XMLRPCCaller, settings: KojiSettings,
                 topic: Callable[[str], str], clock: IReactorTime | None = None) -> None:
        if settings.tasks not in TASK_MODES:
            raise ValueError(f"tasks must be one of {TASK_MODES}")
        self.name = name
        self.client = client
        self.settings = settings
        self.topic = topic
        #: This process's clock, or C{None} to judge "now" by the hub's
        #: last event alone.
        self.clock = clock
        self.description = f"Koji hub {display_url(settings.hub_url)}"
        #: Events skipped because no message could be made of them.
        self.skipped = 0
        # Whether the hub's last event was found before the cursor (warned once).
        self._behind = False
        # Events of history read per poll: event_step, or fewer while a
        # window's answer was larger than the client takes (see _too_large).
        self._event_step = settings.event_step
        #: Build hosts' names by id (C{getHost}), as messages carry them;
        #: at most L{MAX_HOST_NAMES}.
        self._host_names: dict[int, str] = {}

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self.client.close()
        return closed

    def _multicall(self, calls: list[Call]) -> Deferred[list[Any]]:
        d: Deferred[list[Any]] = self.client.multicall(calls, self.settings.batch_size)
        return d

    # --- first start --------------------------------------------------------

    @inlineCallbacks
    def initial_cursor(self) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """
        The hub's current event (or C{backfill_from_event}), the time of that
        event for builds and tasks, and the newest repo id.
        """
        if self.settings.backfill_from_event is None:
            event = yield self.client.call("getLastEvent")
        else:
            event = yield self.client.call("getEvent", self.settings.backfill_from_event)
        event_id, event_ts = self._event(event)
        self._check_start(event_id, event_ts)
        repo_next, pending = 1, []
        if self.settings.repos:
            if self.settings.backfill_from_event is None:
                repo_next, pending = yield self._seed_repos()
            else:
                repo_next = yield self._newest_repo(event_ts)
        # The floors: nothing at or before the start is published, even though
        # the first polls read the overlap before it.
        return {
            "event": event_id,
            "event_ts": event_ts,
            "floor_event": event_id,
            "floor_ts": event_ts,
            "history_seen": {},
            "builds": _time_streams(("created", "completed"), event_ts),
            "tasks": self._task_state(_time_streams(("created", "started", "completed"),
                                                    event_ts)),
            "repos": {"next": repo_next, "pending": pending},
            "streams": self._streams(),
        }

    def _check_start(self, event_id: int, event_ts: float) -> None:
        """
        Refuse to start from an event dated more than L{START_SKEW_LIMIT}
        past this process's clock: it would be the floor for good, and
        nothing dated before it, all builds and tasks to come, would ever be
        published.
        """
        if self.clock is not None and event_ts > self.clock.seconds() + START_SKEW_LIMIT:
            raise KojiError(
                f"the hub's event {event_id} is dated {event_ts!r}, more than a day ahead of "
                "this host's clock: not starting from it"
            )

    def _streams(self) -> list[str]:
        """
        The kinds switched on: tags (and untags), builds, tasks and repos.
        """
        s = self.settings
        on = {"tags": s.tags, "builds": s.builds, "tasks": s.tasks != "none", "repos": s.repos}
        return [name for name, enabled in on.items() if enabled]

    @inlineCallbacks
    def _switch_on(self, cursor: dict[str, Any], streams: list[str], event_id: int,
                   event_ts: float) -> Generator[Deferred[Any], Any, None]:
        """
        Start C{streams}, switched on since the last poll, from the hub's
        present, as a first start does: their positions were left where they
        were switched off (or, off at the first start, at it), and would
        publish everything since.  Tags follow the cursor's event, which
        moves whatever is on, but get an event floor so that the overlap
        read again publishes none from before the switch; builds and tasks
        get a time floor of their own likewise; repos are found again from
        the newest finished C{newRepo} task.

        @param event_id: The hub's last event.
        @param event_ts: Its time.
        """
        self._check_start(event_id, event_ts)
        if "tags" in streams:
            cursor["tags_floor"] = event_id
        if "builds" in streams:
            cursor["builds"] = {**_time_streams(("created", "completed"), event_ts),
                                "floor": event_ts}
        if "tasks" in streams:
            cursor["tasks"] = self._task_state({
                **_time_streams(("created", "started", "completed"), event_ts),
                "floor": event_ts})
        if "repos" in streams:
            repo_next, pending = yield self._seed_repos()
            cursor["repos"] = {"next": repo_next, "pending": pending}
        self.log.info("Switched on since the last poll: publishing {streams} of {hub} from now "
                      "(event {event})", producer=self.name, streams=", ".join(streams),
                      hub=display_url(self.settings.hub_url), event=event_id)

    def _task_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """
        C{state}, the tasks' state at a first start or a switch, with the
        C{tasks} choice they start with recorded (none for C{none}: tasks
        switched on later start afresh, recording their choice then).
        """
        if self.settings.tasks != "none":
            state["choice"] = self.settings.tasks
        return state

    def _widen_tasks(self, state: dict[str, Any], event_id: int,
                     event_ts: float) -> list[str]:
        """
        Record the choice of C{tasks} in the tasks' C{state}, and when it is
        wider than the one recorded (C{scratch} to C{all}, say), start the
        kinds of task it adds from the hub's present: each gets a time floor
        of its own (in C{widened}, by kind), so that the overlap read again
        publishes none of their changes from before the change, while the
        kinds already published go on from where they were, losing nothing
        of the time the poller was stopped.  A narrower choice only drops
        the floors of the kinds it leaves out: widened again later, they get
        new ones.  A cursor without a recorded choice (of an earlier
        version) is taken to have had the current one.

        @param event_id: The hub's last event.
        @param event_ts: Its time.
        @return: The kinds of task added.
        """
        recorded = state.get("choice")
        choice = self.settings.tasks
        before = _task_kinds(recorded if recorded in _TASK_CHOICES else choice)
        kinds = _task_kinds(choice)
        added = [kind for kind in kinds if kind not in before]
        if added:
            self._check_start(event_id, event_ts)
        widened = state.get("widened")
        floors = {kind: ts for kind, ts in (widened if isinstance(widened, dict) else {}).items()
                  if kind in kinds}
        floors.update({kind: event_ts for kind in added})
        if floors:
            state["widened"] = floors
        else:
            state.pop("widened", None)
        state["choice"] = choice
        if added:
            self.log.info("Tasks widened since the last poll from {old} to {new}: the tasks of "
                          "{hub} that {new} adds are published from now (event {event})",
                          producer=self.name, old=recorded, new=choice,
                          hub=display_url(self.settings.hub_url), event=event_id)
        return added

    @inlineCallbacks
    def _newest_repo(self, before: float | None = None
                     ) -> Generator[Deferred[Any], Any, int]:
        """
        The id after the repo of the newest finished C{newRepo} task (that
        finished before C{before}, if given), or 1 if there is none: repos
        are made in id order, so those made since have the ids after it.
        """
        opts: dict[str, Any] = {"method": "newRepo", "state": [TASK_CLOSED], "decode": True}
        if before is not None:
            opts["completeBefore"] = before
        tasks = yield self.client.call("listTasks", opts, {"order": "-id", "limit": 1})
        start = 1
        if isinstance(tasks, list) and tasks and isinstance(tasks[0], dict):
            result = tasks[0].get("result")
            if isinstance(result, list) and len(result) == 1 and isinstance(result[0], list):
                result = result[0]
            if isinstance(result, list) and result and isinstance(result[0], int):
                start = result[0] + 1
        return start

    @inlineCallbacks
    def _seed_repos(self) -> Generator[Deferred[Any], Any, tuple[int, list[int]]]:
        # The newest finished newRepo task names a recent repo; the ones made
        # since are found by looking at the ids after it.
        start = yield self._newest_repo()
        pending: list[int] = []
        for _ in range(20):
            ids = list(range(start, start + 50))
            found = yield self._multicall([Call("repoInfo", (i, kwargs(strict=False)))
                                           for i in ids])
            # By the id asked for: the row's own may be anything.
            present = [(i, r) for i, r in zip(ids, map(unwrap, found)) if isinstance(r, dict)]
            pending += [
                i for i, r in present if _integer(r.get("state")) and r["state"] == REPO_INIT
            ]
            if not present:
                break
            start = max(i for i, _ in present) + 1
        return start, pending

    @staticmethod
    def _event(event: Any) -> tuple[int, float]:
        if not isinstance(event, dict) or not _integer(event.get("id")):
            raise KojiError(
                f"the hub answered {type(event).__name__} for an event"
                if not isinstance(event, dict)
                else f"the hub's event id is not an integer: {escape_control(repr(event.get('id')), 100)}"
            )
        ts = _number(event.get("ts"))
        if ts is None:
            # The event's time is where builds and tasks are read from: a
            # guess (such as 0, the epoch) would publish the hub's history.
            raise KojiError(f"the hub's event {event['id']} has no usable time: "
                            f"{escape_control(repr(event.get('ts')), 100)}")
        return int(event["id"]), ts

    # --- one poll -----------------------------------------------------------

    @inlineCallbacks
    def poll(self, cursor: Any) -> Generator[Deferred[Any], Any, PollResult]:
        """
        Read what happened after C{cursor}; see the module docstring.
        """
        s = self.settings
        require_fields(cursor, "a Koji poller's",
                       {"event": int, "builds": dict, "tasks": dict, "repos": dict})
        c = copy.deepcopy(cursor)
        last_id, last_ts = self._event((yield self.client.call("getLastEvent")))
        start = int(c["event"])
        if last_id < start:
            # Once while it lasts (a restored database may take days to
            # catch up), and once when it is over.
            if not self._behind:
                self._behind = True
                self.log.warn("The hub's last event {last} is before the cursor's {cursor}: "
                              "was its database restored? Waiting for it to catch up",
                              producer=self.name, last=last_id, cursor=start)
            last_id, last_ts = start, float(c.get("event_ts") or last_ts)
        elif self._behind:
            self._behind = False
            self.log.info("The hub's events reached the cursor again ({last})",
                          producer=self.name, last=last_id)
        # Kinds switched on since the last poll start from now.  A cursor of
        # an earlier version does not say which were on: the ones on now are
        # taken to have been, and go on from where they are.
        streams = self._streams()
        switched_on = [k for k in streams if k not in c.get("streams", streams)]
        c["streams"] = streams
        # Tasks switched on start with their choice recorded; tasks that
        # were on may have a wider one now.
        widened = (self._widen_tasks(c["tasks"], last_id, last_ts)
                   if "tasks" in streams and "tasks" not in switched_on else [])
        if switched_on:
            yield self._switch_on(c, switched_on, last_id, last_ts)
        if switched_on or widened:
            # A poll of its own, with nothing to publish, so the switch (or
            # the widening) is saved before anything is read from it (as a
            # first start saves its cursor): a poll whose messages could not
            # all be handed over would otherwise be read again from before
            # the switch, which the next one would place later, and what
            # happened in between would be lost.
            return PollResult([], c, more=True)
        end, end_ts = min(last_id, start + self._event_step), last_ts
        catching_up = end < last_id
        if catching_up:
            event = yield self.client.call("getEvent", end, kwargs(strict=False))
            if event is None:
                # A hole in the event sequence: take the whole rest at once,
                # once the last event is known to be there (one bogus answer
                # would otherwise move the cursor past every event to come).
                if (yield self.client.call("getEvent", last_id, kwargs(strict=False))) is None:
                    raise KojiError(f"the hub's last event {last_id} does not exist "
                                    "(getEvent answers nothing): not moving to it")
                end, catching_up = last_id, False
            else:
                end_ts = self._event(event)[1]
        before = end_ts if catching_up else None

        calls: list[Call] = []
        slots: dict[str, int] = {}

        def add(slot: str, call: Call) -> None:
            slots[slot] = len(calls)
            calls.append(call)

        if s.tags and end > start:
            add("history", Call("queryHistory", (kwargs(
                tables=["tag_listing"], afterEvent=max(0, start - s.event_overlap),
                beforeEvent=end + 1),)))
        build_streams = {"created": ("createdAfter", "createdBefore", "creation_ts"),
                         "completed": ("completeAfter", "completeBefore", "completion_ts")}
        if s.builds:
            for stream, (after_key, before_key, order) in build_streams.items():
                after = self._after(c["builds"], stream)
                add(f"builds.{stream}", Call("listBuilds", (kwargs(
                    **{after_key: after, before_key: before},
                    queryOpts={"order": order, "limit": self._limit(c["builds"], stream)}),)))
        task_streams = {"created": ("createdAfter", "createdBefore", "create_ts"),
                        "started": ("startedAfter", "startedBefore", "start_ts"),
                        "completed": ("completeAfter", "completeBefore", "completion_ts")}
        if s.tasks != "none":
            for stream, (after_key, before_key, order) in task_streams.items():
                opts: dict[str, Any] = {"decode": True, after_key: self._after(c["tasks"], stream)}
                if before is not None:
                    opts[before_key] = before
                if s.tasks != "all":
                    opts["parent"] = None
                if stream in _UNFINISHED:
                    # Finished tasks come from the "completed" stream: asking
                    # again for them here would only double the download.
                    opts["state"] = _UNFINISHED[stream]
                add(f"tasks.{stream}", Call("listTasks", (opts, {
                    "order": order, "limit": self._limit(c["tasks"], stream)})))
        new_repos: list[int] = []
        pending_repos: list[int] = []
        probe = s.repo_probe
        if s.repos:
            repos = c["repos"]
            probe = min(max(int(repos.get("probe", s.repo_probe)), s.repo_probe),
                        max(s.repo_probe, s.page_size))
            new_repos = list(range(int(repos["next"]), int(repos["next"]) + probe))
            pending_repos = [int(i) for i in repos["pending"]]
            for repo_id in new_repos + pending_repos:
                add(f"repo.{repo_id}", Call("repoInfo", (repo_id, kwargs(strict=False))))

        try:
            answers = [unwrap(a) for a in (yield self._multicall(calls))]
        except ResponseTooLarge as e:
            raise self._too_large(e, start, end) from None
        # A window that went through: back towards event_step.
        self._event_step = min(s.event_step, self._event_step * 2)

        def answer(slot: str) -> Any:
            return answers[slots[slot]] if slot in slots else None

        events: list[tuple[float, int, str, Any]] = []  # (position, order, kind, data)
        # What this poll's rows already say, so details are not fetched twice.
        owners: dict[int, Any] = {}
        task_rows: dict[int, dict[str, Any]] = {}
        floor_ts = float(c.get("floor_ts", 0.0))
        more = catching_up
        # Rows later than this do not move a time stream (see _advance): the
        # later of the hub's last event and this process's clock, plus a
        # margin for clocks that disagree a little.
        now = max(last_ts, self.clock.seconds()) if self.clock is not None else last_ts
        limit = now + FUTURE_MARGIN

        # -- tags ---------------------------------------------------------------
        history_seen = _SeenWindow(c.get("history_seen"))
        if s.tags and "history" in slots:
            history = answer("history")
            if not isinstance(history, dict):
                raise KojiError(f"queryHistory answered {type(history).__name__}, not a struct")
            low = max(0, start - s.event_overlap, int(c.get("floor_event", 0)),
                      int(c.get("tags_floor", 0)))
            for row in self._rows(history.get("tag_listing", []), "queryHistory"):
                created, revoked = row.get("create_event"), row.get("revoke_event")
                for op, event_id, ts in (("tag", created, row.get("create_ts")),
                                         ("untag", revoked, row.get("revoke_ts"))):
                    if op == "untag" and revoked is None:
                        continue  # still tagged
                    if not _integer(event_id):
                        self._skip_history(history_seen, op, row, event_id, ts, end, floor_ts)
                        continue
                    if not low < event_id <= end:
                        continue
                    key = f"tag_listing:{op}:{row.get('tag_id')}:{row.get('build_id')}:{event_id}"
                    if key in history_seen:
                        continue
                    history_seen.add(key, event_id)
                    events.append((_number(ts) or 0.0, event_id, op, row))
        c["history_seen"] = history_seen.prune(end - s.event_overlap)
        c["event"], c["event_ts"] = end, end_ts

        # -- builds -------------------------------------------------------------
        if s.builds:
            state = c["builds"]
            floor = _floor(state, floor_ts)
            seen = _SeenWindow(state.get("seen"))
            paging = set(state.get("paging", []))
            current: dict[int, dict[str, Any]] = {}
            for stream, (_, _, order) in build_streams.items():
                rows = self._rows(answer(f"builds.{stream}"), "listBuilds")
                full = self._advance(state, paging, stream, rows, order,
                                     len(rows) >= self._limit(state, stream), end_ts, limit)
                more = more or full
                for row in rows:
                    if isinstance(row.get("build_id"), int):
                        current[row["build_id"]] = row
                        if isinstance(row.get("owner_name"), str):
                            owners[row["build_id"]] = row["owner_name"]
            known: dict[str, int] = dict(state.get("open", {}))
            for build_id, row in sorted(current.items()):
                new = row.get("state")
                position = (_number(row.get("completion_ts")) or _number(row.get("creation_ts"))
                            or 0.0)
                key = f"{build_id}:{new!r}{_attempt(row)}"
                # The key without the attempt, as cursors of earlier
                # versions hold it, counts too.
                if key in seen or f"{build_id}:{new!r}" in seen or position <= floor:
                    continue
                seen.add(key, position)
                if not _integer(new):
                    self._skip("build", f"build {build_id} has the state {new!r}")
                    continue
                old = known.pop(str(build_id), None)
                if new not in FINAL_BUILD_STATES:
                    known[str(build_id)] = new
                events.append((position, 0, "build", (row, old)))
            state["open"] = _cap(known)
            state["paging"] = sorted(paging)
            state["seen"] = seen.prune(self._low_water(state, build_streams))

        # -- tasks --------------------------------------------------------------
        if s.tasks != "none":
            state = c["tasks"]
            floor = _floor(state, floor_ts)
            # The kinds of task a wider choice added start later.
            published = _task_kinds(s.tasks)
            floors = {kind: max(floor, _number(ts) or floor)
                      for kind, ts in state.get("widened", {}).items()}
            seen = _SeenWindow(state.get("seen"))
            paging = set(state.get("paging", []))
            tasks: dict[int, dict[str, Any]] = {}
            for stream, (_, _, order) in task_streams.items():
                rows = self._rows(answer(f"tasks.{stream}"), "listTasks")
                full = self._advance(state, paging, stream, rows, order,
                                     len(rows) >= self._limit(state, stream), end_ts, limit)
                more = more or full
                for row in rows:
                    if isinstance(row.get("id"), int):
                        tasks[row["id"]] = row
                        task_rows[row["id"]] = row
            known = dict(state.get("open", {}))
            for task_id, row in sorted(tasks.items()):
                new = row.get("state")
                kind = _task_kind(row)
                if kind not in published:
                    continue
                position = (_number(row.get("completion_ts")) or _number(row.get("start_ts"))
                            or _number(row.get("create_ts")) or 0.0)
                key = f"{task_id}:{new!r}"
                if key in seen or position <= floors.get(kind, floor):
                    continue
                seen.add(key, position)
                if not _integer(new):
                    self._skip("task", f"task {task_id} has the state {new!r}")
                    continue
                old = known.pop(str(task_id), None)
                if new not in FINAL_TASK_STATES:
                    known[str(task_id)] = new
                events.append((position, 1, "task", (row, old)))
            state["open"] = _cap(known)
            state["paging"] = sorted(paging)
            state["seen"] = seen.prune(self._low_water(state, task_streams))

        # -- repos --------------------------------------------------------------
        if s.repos:
            repos = c["repos"]
            pending = set(pending_repos)
            floor_event = int(c.get("floor_event", 0))
            highest = int(repos["next"]) - 1
            held = False
            for repo_id in new_repos:
                info = answer(f"repo.{repo_id}")
                if not isinstance(info, dict):
                    continue
                made = info.get("create_event")
                made = made if _integer(made) else None
                if made is not None and end < made <= last_id:
                    # Made after the history this poll reads (catching up):
                    # it comes with its event, in order with the rest.  (An
                    # event past the hub's last can not be waited for.)
                    held = True
                    break
                highest = repo_id
                created = _number(info.get("create_ts")) or last_ts
                if made is not None and made <= floor_event:
                    # Made before the first start: not published, but its
                    # end is if it comes later.
                    if self._repo_state(info) and info.get("state") == REPO_INIT:
                        pending.add(repo_id)
                    continue
                events.append((created, 2, "repo.init", info))
                if not self._repo_state(info):
                    continue
                if info.get("state") == REPO_INIT:
                    pending.add(repo_id)
                elif info.get("state") == REPO_READY:
                    events.append((max(created, last_ts), 3, "repo.done", info))
            for repo_id in pending_repos:
                info = answer(f"repo.{repo_id}")
                if not isinstance(info, dict) or not self._repo_state(info):
                    pending.discard(repo_id)
                    continue
                if info.get("state") in _WAS_READY:
                    # Even if expired since (a newer repo of its tag was
                    # quicker than this poll): it was done.
                    created = _number(info.get("create_ts")) or last_ts
                    events.append((max(created, last_ts), 3, "repo.done", info))
                if info.get("state") != REPO_INIT:
                    pending.discard(repo_id)
            # How many ids the next poll looks at.  Every id looked at was a
            # repo: more are likely waiting (a backfill, a long outage), so
            # the next poll comes at once and looks twice as far.  Stopped at
            # a repo made after the history read: about as far as this poll
            # went, twice over.  At most page_size ids either way.
            widest = max(s.repo_probe, s.page_size)
            if held:
                probe = min(max(s.repo_probe, 2 * (highest - new_repos[0] + 1)), widest)
            elif highest == new_repos[-1]:
                more = True
                probe = min(probe * 2, widest)
            else:
                probe = s.repo_probe
            if probe == s.repo_probe:
                repos.pop("probe", None)
            else:
                repos["probe"] = probe
            repos["next"] = highest + 1
            followed = sorted(pending)
            if len(followed) > MAX_PENDING_REPOS:
                self.log.warn(
                    "{count} repos are being made at once; following the newest {limit}, "
                    "the others get no repo.done",
                    count=len(followed), limit=MAX_PENDING_REPOS, producer=self.name,
                )
                followed = followed[-MAX_PENDING_REPOS:]
            repos["pending"] = followed

        events.sort(key=lambda e: (e[0], e[1]))
        messages = yield self._messages(events, owners, task_rows)
        lag = max(0.0, last_ts - end_ts) if catching_up else 0.0
        return PollResult(messages, c, more=more, lag=lag)

    def _too_large(self, error: ResponseTooLarge, start: int, end: int) -> KojiError:
        """
        What a poll whose answer passed the client's size cap fails with.
        The window of events it read is halved for the next poll (a tag
        cloned in one go is one event per hundred builds tagged; a window of
        them can be larger than any cap), back up to C{event_step} once
        windows go through again; a single event too large for the cap
        needs a larger C{max_response_bytes}.
        """
        if end - start > 1:
            self._event_step = max(1, (end - start) // 2)
            return KojiError(f"the answer for events {start + 1}..{end} is larger than "
                             f"{error.limit} bytes; reading {self._event_step} events at a "
                             "time until it passes")
        return KojiError(f"the answer for event {end} alone is larger than {error.limit} "
                         "bytes: raise max_response_bytes")

    def _after(self, state: Mapping[str, Any], stream: str) -> float:
        since = float(state[stream])
        if stream in state.get("paging", []):
            return since
        return since - self.settings.time_overlap

    def _limit(self, state: Mapping[str, Any], stream: str) -> int:
        """
        The rows a stream's next query asks for: C{page_size}, or more while
        a page held nothing but rows of one time (see L{_advance}).
        """
        wider = state.get("limits", {}).get(stream)
        return int(wider) if isinstance(wider, int) and wider > 0 else self.settings.page_size

    def _advance(self, state: dict[str, Any], paging: set[str], stream: str,
                 rows: list[dict[str, Any]], order: str, full: bool, hub_now: float,
                 limit: float) -> bool:
        """
        Move a time stream's position to the newest row it returned.

        After a full page, the next query starts at the page's last time but
        one (no overlap beyond that): the rows of the page's last time are
        read again, as the page may have held only some of them (rows written
        in one transaction share its time, and Koji asks for times strictly
        after the one given); the seen table skips those published already.
        A full page of rows that all share one time can not be paged by
        time: the next query of the stream asks for twice as many rows, up
        to L{MAX_PAGE}, until a page holds more than that time.

        A row later than C{limit} (the hub's "now" and a margin: a broken
        clock, a corrupt row) is published but does not move the position,
        which would otherwise pass every row still to come, for good.  Rows
        sort by time, so a page that holds such a row holds every row before
        it: there is nothing more to page through.

        @param hub_now: The time of the hub's last event (of the last one
            read, while catching up).
        @return: Whether the stream is paging (more rows are waiting).
        """
        times = [t for t in (_number(r.get(order)) for r in rows) if t is not None]
        sane = [t for t in times if t <= limit]
        if len(sane) < len(times):
            full = False
        position = float(state[stream])
        if position > limit:
            # Already past the limit (a cursor saved with no limit kept, a
            # hub whose clock went back): start again from the hub's now,
            # reading rows again rather than losing them.
            position = hub_now
        limits: dict[str, int] = dict(state.get("limits", {}))
        limits.pop(stream, None)
        if sane:
            top = max(sane)
            earlier = [t for t in sane if t < top]
            if full and earlier:
                position = max(position, max(earlier))
            elif full:
                # One time on the whole page: wider pages until it is passed.
                rows_asked = self._limit(state, stream)
                limits[stream] = min(rows_asked * 2, MAX_PAGE)
                if rows_asked >= MAX_PAGE:
                    # More than MAX_PAGE rows of one instant: the rest are
                    # passed over, said once.
                    self.log.warn("More than {rows} {stream} rows of Koji hub {url} share the "
                                  "time {time}: those past the first {rows} are not published",
                                  producer=self.name, rows=MAX_PAGE, stream=stream,
                                  url=display_url(self.settings.hub_url), time=top)
                    limits.pop(stream)
                    position = max(position, top)
            else:
                position = max(position, top)
        elif not times:
            # Nothing after the position, up to the hub's now: the position
            # may move there.  A stream that only asks for unfinished tasks
            # gets no rows on a hub whose tasks all finish between two
            # polls; left behind, it would keep the seen table (pruned
            # below the lowest position) from ever shrinking.
            position = max(position, min(hub_now, limit))
        if limits:
            state["limits"] = limits
        else:
            state.pop("limits", None)
        state[stream] = position
        if full:
            paging.add(stream)
        else:
            paging.discard(stream)
        return full

    def _low_water(self, state: Mapping[str, Any], streams: Mapping[str, Any]) -> float:
        return min(float(state[s]) for s in streams) - self.settings.time_overlap

    @staticmethod
    def _rows(value: Any, method: str) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise KojiError(f"{method} answered {type(value).__name__}, not a list")
        return [row for row in value if isinstance(row, dict)]

    # --- details and messages -----------------------------------------------

    @inlineCallbacks
    def _messages(self, events: list[tuple[float, int, str, Any]], owners: dict[int, Any],
                  task_rows: dict[int, dict[str, Any]]
                  ) -> Generator[Deferred[Any], Any, list[Message]]:
        build_ids = sorted({row["build_id"] for _, _, kind, row in events
                            if kind in ("tag", "untag") and isinstance(row.get("build_id"), int)
                            and row["build_id"] not in owners})
        task_ids = sorted({data[0]["task_id"] for _, _, kind, data in events
                           if kind == "build" and isinstance(data[0].get("task_id"), int)
                           and data[0]["task_id"] not in task_rows})
        calls = [Call("getBuild", (i,)) for i in build_ids]
        calls += [Call("getTaskInfo", (i, kwargs(request=True))) for i in task_ids]
        answers = [unwrap(a) for a in (yield self._multicall(calls))] if calls else []
        owners = {**owners, **{i: a.get("owner_name") if isinstance(a, dict) else None
                               for i, a in zip(build_ids, answers)}}
        task_infos: dict[Any, Any] = {**task_rows, **dict(zip(task_ids, answers[len(build_ids):]))}
        tasks = [t for t in task_infos.values() if isinstance(t, dict)]
        tasks += [data[0] for _, _, kind, data in events if kind == "task"]
        yield self._learn_host_names(tasks)
        messages = []
        for _, event_id, kind, data in events:
            try:
                if kind in ("tag", "untag"):
                    messages.append(self._tag_message(kind, event_id, data,
                                                      owners.get(data.get("build_id"))))
                elif kind == "build":
                    row, old = data
                    messages.append(self._build_message(row, old,
                                                        task_infos.get(row.get("task_id"))))
                elif kind == "task":
                    row, old = data
                    messages.append(self._task_message(row, old))
                else:
                    messages.append(self._repo_message(kind, data))
            except (MessageError, ValueError, TypeError, OverflowError, OSError, KeyError,
                    RecursionError) as e:
                # A row no message can be made of (a broken hub's types, data
                # JSON can not carry) would fail this poll, and every one
                # after it, for good: skip it and go on.
                self._skip(kind, f"{type(e).__name__}: {e}")
        return messages

    @inlineCallbacks
    def _learn_host_names(self, tasks: Sequence[Mapping[str, Any]]) -> Generator[Deferred[Any], Any, None]:
        """
        Ask the hub the names of the build hosts of C{tasks} not known yet:
        a task's info in a message carries C{host_name} (koji-fedoramessaging
        adds it; C{getTaskInfo} gives the id only), and fedora-messaging's
        Koji message classes read it.  A host the hub does not name stays
        unnamed (C{None}); the poll goes on.
        """
        wanted = sorted({
            t["host_id"] for t in tasks
            if _integer(t.get("host_id")) and t["host_id"] not in self._host_names
        })
        if not wanted:
            return
        answers = yield self._multicall([Call("getHost", (i,)) for i in wanted])
        if len(self._host_names) + len(wanted) > MAX_HOST_NAMES:
            self._host_names.clear()
        for host_id, answer in zip(wanted, answers):
            name = answer.get("name") if isinstance(answer, dict) else None
            if isinstance(name, str):
                self._host_names[host_id] = name

    def _skip(self, kind: str, error: str) -> None:
        """
        Count and log an event no message can be made of.
        """
        self.skipped += 1
        self.log.warn("Skipping a {kind} event of {hub}: {error}", producer=self.name,
                      kind=kind, hub=display_url(self.settings.hub_url),
                      error=escape_control(error, 300))

    def _skip_history(self, seen: _SeenWindow, op: str, row: Mapping[str, Any], event_id: Any,
                      ts: Any, end: int, floor_ts: float) -> None:
        """
        Skip a tag or untag whose event is not an integer (Koji's event
        columns are C{INTEGER}): it can not be placed in the history, and
        would be dropped unseen.  It is counted once while the overlap reads
        its row again.

        @param seen: The keys of the history published or skipped.
        @param op: C{tag} or C{untag}.
        @param event_id: The event the row gives for C{op}.
        @param ts: The time the row gives for C{op}.
        @param end: The last event this poll reads.
        @param floor_ts: The time of the first start: what is not later is
            not published, so not warned of either.
        """
        key = f"tag_listing:{op}:{row.get('tag_id')}:{row.get('build_id')}:{event_id!r}"
        when = _number(ts)
        if key in seen or (when is not None and when <= floor_ts):
            return
        # Kept as long as the row's other event, or this poll's last one
        # (the row came in this poll's window), is read again.
        others = [e for e in (row.get("create_event"), row.get("revoke_event")) if _integer(e)]
        seen.add(key, max([end, *others]))
        self._skip(op, f"the {op} of build {row.get('build_id')!r} in tag "
                       f"{row.get('tag.name')!r} has the event {event_id!r}")

    def _repo_state(self, info: Mapping[str, Any]) -> bool:
        """
        Whether a repo's C{state} is an integer (Koji's column is
        C{INTEGER}).  Otherwise whether the repo is done can not be told: its
        C{repo.done} is skipped, and the repo is no longer looked at.
        """
        if _integer(info.get("state")):
            return True
        self._skip("repo.done", f"repo {info.get('id')!r} has the state {info.get('state')!r}")
        return False

    def _message(self, suffix: str, body: dict[str, Any], key: str, summary: str, *,
                 severity: int = INFO, priority: int = 0, users: tuple[Any, ...] = (),
                 packages: tuple[Any, ...] = ()) -> Message:
        headers: dict[str, Any] = {SUMMARY_HEADER: escape_control(summary, 500)}
        for user in users:
            if isinstance(user, str) and user:
                headers[f"fedora_messaging_user_{user}"] = True
        for package in packages:
            if isinstance(package, str) and package:
                headers[f"fedora_messaging_rpm_{package}"] = True
        return Message.create(
            self.topic(suffix), body, headers=headers, severity=severity, priority=priority,
            schema=SCHEMAS[suffix],
            id=str(uuid.uuid5(_NAMESPACE, f"{self.settings.hub_url}|{key}")),
        )

    def _common(self) -> dict[str, Any]:
        return {"instance": self.settings.instance, "base_url": self.settings.base_url}

    def _tag_message(self, op: str, event_id: int, row: Mapping[str, Any],
                     owner: Any) -> Message:
        user = row.get("creator_name") if op == "tag" else row.get("revoker_name")
        body: dict[str, Any] = {
            "tag": row.get("tag.name"), "tag_id": row.get("tag_id"), "name": row.get("name"),
            "version": row.get("version"), "release": row.get("release"),
            "build_id": row.get("build_id"), **self._common(),
        }
        if isinstance(user, str):
            body["user"] = user
        if isinstance(owner, str):
            body["owner"] = owner
        tag = str(row.get("tag.name") or "")
        nvr = f"{row.get('name')}-{row.get('version')}-{row.get('release')}"
        action = "tagged into" if op == "tag" else "untagged from"
        if tag.startswith("f") and tag.endswith("-rebuild") and tag[1:-8].isdigit():
            priority = 0
        elif tag == "eln" or tag.startswith("eln-"):
            priority = 1
        else:
            priority = 2
        return self._message(
            f"buildsys.{op}", body, f"{op}:{row.get('tag_id')}:{row.get('build_id')}:{event_id}",
            f"{nvr} was {action} {tag} by {user}", severity=DEBUG, priority=priority,
            users=(user, owner), packages=(row.get("name"),),
        )

    def _task_info(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """
        A Koji task dict the way koji-fedoramessaging puts it in messages:
        times as epoch numbers, URL added, bookkeeping dropped.
        """
        info = {k: v for k, v in task.items()
                if k not in ("weight", "create_ts", "start_ts", "completion_ts", "owner_type",
                             "owner_name")}
        info["create_time"] = _number(task.get("create_ts")) or 0.0
        info["start_time"] = task.get("start_ts")
        info["completion_time"] = task.get("completion_ts")
        if isinstance(task.get("owner_name"), str):
            info["owner"] = task["owner_name"]
        info.setdefault("host_id", None)
        host_id = info["host_id"]
        info["host_name"] = self._host_names.get(host_id) if _integer(host_id) else None
        # Fedora's plugin lists the sub-tasks, read in the hub's database; over
        # the API that would be a call and a result per child: none are given.
        info["children"] = []
        info.setdefault("arch", "noarch")
        info["result"] = _result(task)
        if not isinstance(info.get("request"), list):
            info.pop("request", None)
        info["url"] = f"{self.settings.web_url}/taskinfo?taskID={task.get('id')}"
        return info

    def _build_message(self, row: Mapping[str, Any], old: int | None,
                       task: Mapping[str, Any] | None) -> Message:
        build_id = row.get("build_id")
        new = int(row["state"])
        info = self._task_info(task) if isinstance(task, dict) else None
        body: dict[str, Any] = {
            "name": row.get("name"), "version": row.get("version"),
            "release": row.get("release"), "epoch": row.get("epoch"), "attribute": "state",
            "old": old, "new": new, "build_id": build_id, "task_id": row.get("task_id"),
            "owner": row.get("owner_name"), "url": f"{self.settings.web_url}/buildinfo?buildID={build_id}",
            "files_base_url": self.settings.files_base_url,
            "task": info, "request": info.get("request") if info else None,
            "creation_time": iso_time(row.get("creation_ts")) or "",
            "completion_time": iso_time(row.get("completion_ts")), **self._common(),
        }
        state = BUILD_STATES[new] if 0 <= new < len(BUILD_STATES) else str(new)
        return self._message(
            "buildsys.build.state.change", body, f"build:{build_id}:{new}{_attempt(row)}",
            f"Build {state}: {row.get('owner_name')}'s {row.get('nvr')}",
            users=(row.get("owner_name"),), packages=(row.get("name"),),
        )

    def _task_message(self, row: Mapping[str, Any], old: int | None) -> Message:
        new = int(row["state"])
        request = row.get("request")
        srpm = ""
        if isinstance(request, list) and request and isinstance(request[0], str):
            srpm = posixpath.basename(request[0])
        owner = row.get("owner_name")
        body: dict[str, Any] = {
            "info": self._task_info(row), "id": row.get("id"), "method": row.get("method"),
            "attribute": "state", "old": _state_name(TASK_STATES, old),
            "new": _state_name(TASK_STATES, new), "srpm": srpm,
            "owner": owner if isinstance(owner, str) else None,
            "files_base_url": self.settings.files_base_url, **self._common(),
        }
        return self._message(
            "buildsys.task.state.change", body, f"task:{row.get('id')}:{new}",
            f"Task {body['new']} -- {row.get('method')} ({srpm} {row.get('arch')})",
            users=(body["owner"],),
        )

    def _repo_message(self, kind: str, info: Mapping[str, Any]) -> Message:
        body = {"tag": info.get("tag_name"), "tag_id": info.get("tag_id"),
                "repo_id": info.get("id"), **self._common()}
        what = "initialized" if kind == "repo.init" else "done"
        return self._message(
            f"buildsys.{kind}", body, f"{kind}:{info.get('id')}",
            f"Repo {info.get('id')} for {info.get('tag_name')} {what}", severity=DEBUG,
        )


def _attempt(row: Mapping[str, Any]) -> str:
    """
    What tells a build's attempts apart: Koji gives a failed or cancelled
    build that is built again (the same NVR) its row back, with its build id
    and a new creation event.  C{":<creation event>"}, or nothing for a row
    without one.
    """
    event = row.get("creation_event_id")
    return f":{event}" if _integer(event) else ""


def _integer(value: Any) -> TypeGuard[int]:
    """
    Whether C{value} is an integer as Koji sends one (a state, an event id:
    C{INTEGER} columns), not a boolean, a string or nil.
    """
    return isinstance(value, int) and not isinstance(value, bool)


def _state_name(names: tuple[str, ...], state: int | None) -> str | None:
    if state is None:
        return None
    return names[state] if 0 <= state < len(names) else str(state)


# --- the plugin ---------------------------------------------------------


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


def _task_mode(value: str) -> str | None:
    return None if value in TASK_MODES else f"must be one of {', '.join(TASK_MODES)}"


@implementer(IPlugin, IProducerPlugin)
class KojiPlugin:
    """
    The C{koji} producer plugin.
    """

    name = "koji"
    description = "Poll a Koji hub over XML-RPC and publish buildsys.* messages."
    options: Mapping[str, Option] = {
        "hub_url": Option(str, REQUIRED, "The hub's XML-RPC URL, e.g. https://koji.example/kojihub.",
                          check=http_url),
        "web_url": Option(str, None, "koji-web's base URL for links (default: from hub_url).",
                          check=http_url),
        "base_url": Option(str, None, "The base_url field (default: the hub's site).",
                           check=http_url),
        "files_base_url": Option(str, None, "Where task files are served "
                                 "(default: <site>/kojifiles/work).", check=http_url),
        "instance": Option(str, "primary", "The instance field of every message."),
        "tags": Option(bool, True, "Publish buildsys.tag and buildsys.untag."),
        "builds": Option(bool, True, "Publish buildsys.build.state.change."),
        "tasks": Option(str, "scratch", "Task state changes of: scratch, parents, all or none.",
                        check=_task_mode),
        "repos": Option(bool, True, "Publish buildsys.repo.init and buildsys.repo.done."),
        "backfill_from_event": Option(int, None, "On first start, publish from after this "
                                      "event instead of from now.", check=_not_negative),
        "event_step": Option(int, 1000, "At most this many events of history per poll.",
                             check=_at_least_one),
        "event_overlap": Option(int, 20, "Events of history read again each poll.",
                                check=_not_negative),
        "time_overlap": Option(float, 120.0, "Seconds of builds and tasks read again each poll.",
                               check=_not_negative),
        "page_size": Option(int, 500, "At most this many rows per query.", check=_at_least_one),
        "batch_size": Option(int, 100, "At most this many calls per multiCall.",
                             check=_at_least_one),
        "repo_probe": Option(int, 10, "Repo ids looked at past the newest known one.",
                             check=_at_least_one),
        **poller_options(30.0),
    }

    def build(self, context: Any) -> PollingService:
        """
        A polling service for the configured hub.  No I/O happens here.
        """
        options = context.options
        names = ("web_url", "base_url", "files_base_url", "instance", "tags", "builds", "tasks",
                 "repos", "backfill_from_event", "event_step", "event_overlap", "time_overlap",
                 "page_size", "batch_size", "repo_probe")
        settings = KojiSettings.for_hub(options["hub_url"],
                                        **{n: options[n] for n in names if n in options})
        client = XMLRPCClient(settings.hub_url, context.reactor, multicall_method="multiCall",
                              **client_settings(options))
        source = KojiSource(context.name, client, settings, context.topic, context.reactor)
        return polling_service(context, source)
