"""
Tests for L{fedhub.producers.koji}: what the Koji poller publishes for the
changes of a fake hub, that every body validates against
C{koji-fedoramessaging-messages}, and how it behaves across restarts,
catch-up, late commits and a misbehaving hub.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import fail, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from fedhub.config import HubSettings
from fedhub.interfaces import IProducerPlugin
from fedhub.message import DEBUG, INFO, Message, dump_line
from fedhub.plugins import PluginContext
from fedhub.producers.koji import (
    SCHEMAS,
    KojiError,
    KojiPlugin,
    KojiSettings,
    KojiSource,
    kwargs,
)
from fedhub.producers.poller import IPollSource, PollingService, PollResult, run_inline
from fedhub.text import SUMMARY_HEADER
from fedhub.xmlrpc import ResponseTooLarge, XMLRPCClient, XMLRPCFault
from tests.fakes_xmlrpc import (
    BUILDING,
    CLOSED,
    COMPLETE,
    FAILED,
    OPEN,
    REPO_EXPIRED,
    REPO_PROBLEM,
    REPO_READY,
    DirectCaller,
    FakeKoji,
    check_with_schema_package,
    koji_bodies,
    koji_time,
    listen,
    schema_names,
)
from tests.test_poller import FakePublisher

reactor: Any = _reactor
HUB = "https://koji.example.org/kojihub"
PREFIX = "org.fedoraproject.test."


def topic(suffix: str) -> str:
    return PREFIX + suffix


def suffixes(messages: list[Message]) -> list[str]:
    return [m.topic[len(PREFIX):] for m in messages]


class SourceTestBase(SynchronousTestCase):
    """
    A fake hub, called in-process, and a source over it.
    """

    def setUp(self) -> None:
        self.koji = FakeKoji()
        self.caller = DirectCaller(self.koji.server, HUB, multicall_method="multiCall")

    def source(self, **settings: Any) -> KojiSource:
        return KojiSource("koji", self.caller, KojiSettings.for_hub(HUB, **settings), topic)

    def logged(self) -> list[dict[str, Any]]:
        """
        The log events of the rest of the test.
        """
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    def start(self, source: KojiSource) -> Any:
        return self.successResultOf(source.initial_cursor())

    def poll(self, source: KojiSource, cursor: Any) -> PollResult:
        result: PollResult = self.successResultOf(source.poll(cursor))
        for message in result.messages:
            check_with_schema_package(message)
        return result

    def drain(self, source: KojiSource, cursor: Any, limit: int = 100) -> tuple[list[Message], Any]:
        """
        Poll until the source has nothing more right now.
        """
        messages: list[Message] = []
        for _ in range(limit):
            result = self.poll(source, cursor)
            messages += result.messages
            cursor = result.cursor
            if not result.more:
                return messages, cursor
        self.fail("the source never caught up")


class SettingsTests(SynchronousTestCase):
    """
    L{KojiSettings.for_hub}.
    """

    def test_derived_urls(self) -> None:
        """Web, site and files URLs are derived from a /kojihub URL."""
        s = KojiSettings.for_hub("https://koji.fedoraproject.org/kojihub")
        self.assertEqual(s.web_url, "https://koji.fedoraproject.org/koji")
        self.assertEqual(s.base_url, "https://koji.fedoraproject.org")
        self.assertEqual(s.files_base_url, "https://koji.fedoraproject.org/kojifiles/work")

    def test_given_urls_win(self) -> None:
        """Configured URLs are used as given; None means derive."""
        s = KojiSettings.for_hub(HUB, web_url="https://web.example/koji", files_base_url=None)
        self.assertEqual(s.web_url, "https://web.example/koji")
        self.assertEqual(s.files_base_url, "https://koji.example.org/kojifiles/work")

    def test_kwargs(self) -> None:
        """Keyword arguments travel as one __starstar struct without None values."""
        self.assertEqual(kwargs(a=1, b=None), {"a": 1, "__starstar": True})

    def test_bad_task_mode(self) -> None:
        """An unknown task mode is refused."""
        self.assertRaises(ValueError, KojiSource, "k", None, KojiSettings.for_hub(HUB, tasks="x"),
                          topic)


class SourceTests(SourceTestBase):
    """
    L{KojiSource} against the fake hub.
    """

    def test_interface(self) -> None:
        """KojiSource provides IPollSource."""
        self.assertTrue(verifyObject(IPollSource, self.source()))

    def test_first_start_at_current_event(self) -> None:
        """The first cursor is the hub's last event; older history is not published."""
        source = self.source()
        cursor = self.start(source)
        self.assertEqual(cursor["event"], self.koji.last_event)
        self.assertEqual(cursor["repos"]["next"], 2581)
        result = self.poll(source, cursor)
        self.assertEqual(result.messages, [])
        self.assertFalse(result.more)

    def test_nothing_from_before_first_start(self) -> None:
        """Tags, builds and tasks just before the first start (within the overlaps) are not published."""
        build, _ = self.koji.start_build("early", "1", "1")
        self.koji.scratch_build("early.src.rpm")
        # The hub's clock is its last event: the start is judged by it.
        self.koji.tag_build(574, "f24")
        source = self.source(tasks="all")
        cursor = self.start(source)
        self.koji.finish_build(build)
        self.koji.event()
        result = self.poll(source, cursor)
        self.assertEqual(
            [(suffixes([m])[0], m.body.get("old"), m.body.get("new")) for m in result.messages],
            [("buildsys.build.state.change", None, COMPLETE),
             ("buildsys.task.state.change", None, "CLOSED")])

    def test_idle_poll_cost(self) -> None:
        """A poll with nothing new is two requests: getLastEvent and one multiCall."""
        source = self.source()
        cursor = self.start(source)
        before = self.caller.requests
        self.poll(source, cursor)
        self.assertEqual(self.caller.requests - before, 2)
        self.assertNotIn("queryHistory", self.koji.server.calls)

    def test_tag_and_untag(self) -> None:
        """Tagging and untagging publish buildsys.tag and buildsys.untag in event order."""
        source = self.source(builds=False, tasks="none", repos=False)
        cursor = self.start(source)
        build = 574
        self.koji.tag_build(build, "f31-updates-pending", user=3)
        self.koji.untag_build(build, "f31-updates-pending", user=3)
        self.koji.tag_build(build, "f24", user=2)
        result = self.poll(source, cursor)
        self.assertEqual(suffixes(list(result.messages)),
                         ["buildsys.tag", "buildsys.untag", "buildsys.tag"])
        tag, untag, retag = result.messages
        self.assertEqual(dict(tag.body), {
            "tag": "f31-updates-pending", "tag_id": 6446, "name": "fake", "version": "1.1",
            "release": "35MYDISTTAG", "build_id": 574, "user": "bodhi", "owner": "mikem",
            "instance": "primary", "base_url": "https://koji.example.org",
        })
        self.assertEqual(untag.body["user"], "bodhi")
        self.assertEqual(retag.body["user"], "kojiadmin")
        self.assertEqual(tag.schema, "koji_fedoramessaging.tag.TagV1")
        self.assertEqual(untag.schema, "koji_fedoramessaging.tag.UntagV1")
        self.assertEqual((tag.severity, tag.priority), (DEBUG, 2))
        self.assertEqual(tag.headers[SUMMARY_HEADER],
                         "fake-1.1-35MYDISTTAG was tagged into f31-updates-pending by bodhi")
        self.assertTrue(tag.headers["fedora_messaging_user_mikem"])
        self.assertTrue(tag.headers["fedora_messaging_rpm_fake"])
        self.assertEqual(self.poll(source, result.cursor).messages, [])

    def test_build_lifecycle(self) -> None:
        """A build publishes None->BUILDING, then BUILDING->COMPLETE with its task."""
        source = self.source(tasks="none", repos=False)
        cursor = self.start(source)
        build, task = self.koji.start_build("python-requests", "2.32.3", "1.fc42")
        first = self.poll(source, cursor)
        self.koji.finish_build(build)
        second = self.poll(source, first.cursor)
        self.assertEqual([(m.body["old"], m.body["new"]) for m in first.messages], [(None, BUILDING)])
        self.assertEqual([(m.body["old"], m.body["new"]) for m in second.messages],
                         [(BUILDING, COMPLETE)])
        body = second.messages[0].body
        self.assertEqual(body["build_id"], build)
        self.assertEqual(body["task_id"], task)
        self.assertEqual(body["owner"], "mikem")
        self.assertEqual(body["url"], f"https://koji.example.org/koji/buildinfo?buildID={build}")
        self.assertEqual(body["task"]["id"], task)
        self.assertEqual(body["task"]["url"],
                         f"https://koji.example.org/koji/taskinfo?taskID={task}")
        self.assertIsInstance(body["task"]["create_time"], float)
        self.assertEqual(body["request"][1], "f24")
        self.assertTrue(body["creation_time"].endswith("+00:00"))
        self.assertIsNotNone(body["completion_time"])
        self.assertEqual(second.messages[0].headers[SUMMARY_HEADER],
                         "Build COMPLETE: mikem's python-requests-2.32.3-1.fc42")
        self.assertEqual(second.messages[0].severity, INFO)
        self.assertEqual(second.cursor["builds"]["open"], {})

    def test_failed_and_imported_builds(self) -> None:
        """A failed build and an imported one (no task) are published with their states."""
        source = self.source(tasks="none", repos=False)
        cursor = self.start(source)
        failing, _ = self.koji.start_build("broken", "1", "1")
        self.koji.finish_build(failing, FAILED)
        imported = self.koji.import_build("chromium", "80.0.3987.132", "1.fc33", owner=4)
        messages, _ = self.drain(source, cursor)
        states = {m.body["build_id"]: (m.body["old"], m.body["new"], m.body["task"])
                  for m in messages}
        self.assertEqual(states[failing][:2], (None, FAILED))
        self.assertEqual(states[imported], (None, COMPLETE, None))

    def test_scratch_task_states(self) -> None:
        """Scratch builds' parent tasks publish state names; normal builds' tasks do not."""
        source = self.source(builds=False, repos=False)
        cursor = self.start(source)
        self.koji.start_build("normal", "1", "1")
        task = self.koji.scratch_build("tasks/1/libfreehand-0.1.2-6.fc32.src.rpm")
        first = self.poll(source, cursor)
        self.koji.set_task_state(task, OPEN)
        second = self.poll(source, first.cursor)
        self.koji.set_task_state(task, CLOSED, result=None)
        third = self.poll(source, second.cursor)
        changes = [(m.body["id"], m.body["old"], m.body["new"])
                   for m in [*first.messages, *second.messages, *third.messages]]
        self.assertEqual(changes, [(task, None, "FREE"), (task, "FREE", "OPEN"),
                                   (task, "OPEN", "CLOSED")])
        body = third.messages[0].body
        self.assertEqual(body["srpm"], "libfreehand-0.1.2-6.fc32.src.rpm")
        self.assertEqual(body["owner"], "koschei")
        self.assertEqual(body["method"], "build")
        self.assertEqual(body["files_base_url"], "https://koji.example.org/kojifiles/work")
        self.assertIsNone(body["info"]["result"])
        self.assertEqual(third.cursor["tasks"]["open"], {})

    def test_all_parent_tasks(self) -> None:
        """With tasks = parents, every top-level task is published."""
        source = self.source(builds=False, repos=False, tasks="parents")
        cursor = self.start(source)
        _, task = self.koji.start_build("normal", "1", "1")
        result = self.poll(source, cursor)
        self.assertEqual([m.body["id"] for m in result.messages], [task])

    def test_repos(self) -> None:
        """A new repo publishes repo.init, and repo.done once it is ready; a failed one no done."""
        source = self.source(builds=False, tasks="none")
        cursor = self.start(source)
        ready = self.koji.new_repo("f24")
        broken = self.koji.new_repo("f33-build")
        first = self.poll(source, cursor)
        self.koji.repo_state(ready, REPO_READY)
        self.koji.repo_state(broken, REPO_PROBLEM)
        second = self.poll(source, first.cursor)
        third = self.poll(source, second.cursor)
        self.assertEqual([(suffixes([m])[0], m.body["repo_id"]) for m in first.messages],
                         [("buildsys.repo.init", ready), ("buildsys.repo.init", broken)])
        self.assertEqual([(suffixes([m])[0], m.body["repo_id"]) for m in second.messages],
                         [("buildsys.repo.done", ready)])
        self.assertEqual(dict(second.messages[0].body), {
            "tag": "f24", "tag_id": 2, "repo_id": ready, "instance": "primary",
            "base_url": "https://koji.example.org"})
        self.assertEqual(third.messages, [])
        self.assertEqual(third.cursor["repos"], {"next": broken + 1, "pending": []})

    def test_repo_ready_then_expired_between_polls(self) -> None:
        """
        A repo followed while being made that is ready and then expired by
        the next poll (a newer repo of its tag was quick) gets its repo.done:
        Koji expires only ready repos.
        """
        source = self.source(builds=False, tasks="none", tags=False)
        cursor = self.start(source)
        repo = self.koji.new_repo("f24")
        first = self.poll(source, cursor)
        self.koji.repo_state(repo, REPO_READY)
        newer = self.koji.new_repo("f24")
        self.koji.repo_state(newer, REPO_READY)
        self.koji.repo_state(repo, REPO_EXPIRED)
        self.koji.event()
        second = self.poll(source, first.cursor)
        done = [m.body["repo_id"] for m in first.messages + second.messages
                if m.topic.endswith(".repo.done")]
        self.assertEqual(sorted(done), sorted([repo, newer]))
        self.assertEqual(second.cursor["repos"]["pending"], [])

    def test_repos_seen_pending_at_first_start(self) -> None:
        """A repo still being made at first start gets its repo.done later, not its init."""
        repo = self.koji.new_repo("f24")
        source = self.source(builds=False, tasks="none")
        cursor = self.start(source)
        self.assertEqual(cursor["repos"], {"next": repo + 1, "pending": [repo]})
        self.koji.repo_state(repo, REPO_READY)
        result = self.poll(source, cursor)
        self.assertEqual(suffixes(list(result.messages)), ["buildsys.repo.done"])

    def test_everything_in_time_order(self) -> None:
        """Messages of one poll come in the order things happened, across kinds."""
        source = self.source(tasks="parents")
        cursor = self.start(source)
        build, _ = self.koji.start_build("a", "1", "1")
        self.koji.tag_build(574, "f24")
        self.koji.new_repo("f24")
        self.koji.finish_build(build)
        result = self.poll(source, cursor)
        # The poll sees each thing as it is now: the build complete, its task
        # closed, the newRepo task open.
        self.assertEqual(
            [(suffixes([m])[0], m.body.get("method"), m.body.get("new")) for m in result.messages],
            [("buildsys.tag", None, None),
             ("buildsys.task.state.change", "newRepo", "OPEN"),
             ("buildsys.repo.init", None, None),
             ("buildsys.build.state.change", None, COMPLETE),
             ("buildsys.task.state.change", "build", "CLOSED")],
        )

    def test_backfill_and_catch_up(self) -> None:
        """backfill_from_event starts in the past; catching up goes in bounded steps, in order."""
        tags = []
        for _ in range(25):
            tags.append(self.koji.tag_build(574, "f24"))
            self.koji.untag_build(574, "f24")
        source = self.source(builds=False, tasks="none", repos=False,
                             backfill_from_event=tags[0] - 1, event_step=7)
        cursor = self.start(source)
        self.assertEqual(cursor["event"], tags[0] - 1)
        first = self.poll(source, cursor)
        self.assertTrue(first.more)
        self.assertGreater(first.lag or 0.0, 0.0)
        self.assertEqual(len(first.messages), 7)
        messages, cursor = self.drain(source, first.cursor)
        messages = list(first.messages) + messages
        self.assertEqual(suffixes(messages), ["buildsys.tag", "buildsys.untag"] * 25)
        self.assertEqual(len({m.id for m in messages}), 50)
        self.assertEqual(cursor["event"], self.koji.last_event)

    def test_backfill_includes_recorded_history(self) -> None:
        """Backfilling over the recorded sample history publishes its tag and untag."""
        source = self.source(builds=False, tasks="none", repos=False, backfill_from_event=584)
        self.koji.events.insert(0, (584, 1613744950.0))
        cursor = self.start(source)
        messages, _ = self.drain(source, cursor)
        self.assertEqual([(suffixes([m])[0], m.body["build_id"]) for m in messages][:2],
                         [("buildsys.tag", 6), ("buildsys.untag", 5)])

    def test_backfill_includes_repos(self) -> None:
        """backfill_from_event publishes the repos made after it, in order with the tags, once."""
        earlier = self.koji.new_repo("f24")
        self.koji.repo_state(earlier, REPO_READY)
        unfinished = self.koji.new_repo("f24")  # made before the start, ready after it
        self.koji.tick()
        start = self.koji.event()
        expected: list[tuple[str, int]] = []
        ready: list[int] = []
        for i in range(12):
            expected.append(("buildsys.tag", self.koji.tag_build(574, "f24")))
            repo = self.koji.new_repo("f33-build" if i % 2 else "f24")
            expected.append(("buildsys.repo.init", repo))
            if i % 3 == 0:
                self.koji.repo_state(repo, REPO_PROBLEM)
            elif i != 11:
                self.koji.repo_state(repo, REPO_READY)
                ready.append(repo)
        building = repo
        source = self.source(builds=False, tasks="none", backfill_from_event=start,
                             event_step=5, repo_probe=2, page_size=4)
        cursor = self.start(source)
        # Where the newest newRepo task finished before the start left off.
        self.assertEqual(cursor["repos"], {"next": earlier + 1, "pending": []})
        first = self.poll(source, cursor)
        self.assertTrue(first.more)
        self.koji.repo_state(unfinished, REPO_READY)
        messages, cursor = self.drain(source, first.cursor)
        messages = list(first.messages) + messages
        # Tags are published in event order; a repo may come after tags made
        # later than it (its stream trails while its probe widens), never
        # before a tag made earlier.
        tag_events = [e for s, e in expected if s == "buildsys.tag"]
        self.assertEqual(suffixes(messages).count("buildsys.tag"), len(tag_events))
        inits = []
        for i, message in enumerate(messages):
            if message.topic.endswith("repo.init"):
                made = self.koji.repos[message.body["repo_id"]]["create_event"]
                tags_before = suffixes(messages[:i]).count("buildsys.tag")
                self.assertGreaterEqual(tags_before, len([e for e in tag_events if e < made]))
                inits.append(message.body["repo_id"])
        self.assertEqual(inits, [r for s, r in expected if s == "buildsys.repo.init"])
        self.assertEqual(sorted(m.body["repo_id"] for m in messages
                                if m.topic.endswith("repo.done")), [unfinished, *ready])
        self.assertEqual(len({m.id for m in messages}), len(messages))
        self.assertEqual(cursor["repos"], {"next": building + 1, "pending": [building]})
        self.koji.repo_state(building, REPO_READY)
        last = self.poll(source, cursor)
        self.assertEqual([(suffixes([m])[0], m.body["repo_id"]) for m in last.messages],
                         [("buildsys.repo.done", building)])

    def test_backfill_repo_start_is_bounded(self) -> None:
        """First start with a backfill costs two calls, whatever the number of repos since."""
        start = self.koji.event()
        for _ in range(60):
            self.koji.repo_state(self.koji.new_repo("f24"), REPO_READY)
        source = self.source(builds=False, tasks="none", tags=False, backfill_from_event=start)
        before = self.caller.requests
        cursor = self.start(source)
        self.assertEqual(self.caller.requests - before, 2)
        self.assertEqual(self.koji.server.calls.count("repoInfo"), 0)
        messages, _ = self.drain(source, cursor)
        self.assertEqual(suffixes(messages).count("buildsys.repo.init"), 60)
        self.assertEqual(suffixes(messages).count("buildsys.repo.done"), 60)

    def test_late_commit_within_overlap(self) -> None:
        """A tag committed after a later event was seen is still published, once."""
        source = self.source(builds=False, tasks="none", repos=False, event_overlap=5)
        cursor = self.start(source)
        self.koji.tag_build(574, "f24")
        late_event = self.koji.event()
        self.koji.tag_build(574, "f31-updates-pending")
        row = self.koji.tag_listing.pop()  # not committed yet when the poll runs
        late_row = dict(row, create_event=late_event, **{"tag.name": "f33-build", "tag_id": 18677})
        first = self.poll(source, cursor)
        self.koji.tag_listing.append(row)
        self.koji.tag_listing.append(late_row)
        self.koji.event()  # the hub moves on
        second = self.poll(source, first.cursor)
        third = self.poll(source, second.cursor)
        self.assertEqual([m.body["tag"] for m in first.messages], ["f24"])
        self.assertEqual(sorted(m.body["tag"] for m in second.messages),
                         ["f31-updates-pending", "f33-build"])
        self.assertEqual(third.messages, [])

    def test_build_paging(self) -> None:
        """More builds than a page are fetched over several polls, each once."""
        source = self.source(tasks="none", repos=False, page_size=3)
        cursor = self.start(source)
        builds = [self.koji.start_build(f"p{i}", "1", "1")[0] for i in range(10)]
        messages, _ = self.drain(source, cursor)
        self.assertEqual([m.body["build_id"] for m in messages], builds)

    def test_same_ids_for_same_events(self) -> None:
        """Polling the same window twice gives the same message ids (duplicates are identifiable)."""
        source = self.source()
        cursor = self.start(source)
        build, _ = self.koji.start_build("a", "1", "1")
        self.koji.tag_build(build, "f24")
        first = self.poll(source, cursor)
        again = self.poll(self.source(), cursor)
        self.assertEqual([m.id for m in first.messages], [m.id for m in again.messages])
        self.assertNotEqual(first.messages[0].id, first.messages[1].id)

    def test_poll_leaves_cursor_alone(self) -> None:
        """poll() never changes the cursor it was given."""
        source = self.source()
        cursor = self.start(source)
        import copy
        frozen = copy.deepcopy(cursor)
        self.koji.start_build("a", "1", "1")
        self.koji.tag_build(574, "f24")
        self.poll(source, cursor)
        self.assertEqual(cursor, frozen)

    def test_fault_fails_poll(self) -> None:
        """A fault of any query fails the poll (so the cursor stays)."""
        source = self.source()
        cursor = self.start(source)
        self.koji.fail_methods["listBuilds"] = 1
        failure = self.failureResultOf(source.poll(cursor), XMLRPCFault)
        self.assertEqual(failure.value.method, "listBuilds")

    def test_wrong_types_in_rows(self) -> None:
        """Rows with wrong types (a string for a time, a string for a build) do not fail the poll."""
        source = self.source(builds=False, tasks="none", repos=False)
        cursor = self.start(source)
        self.koji.tag_build(574, "f24")
        self.koji.tag_listing[-1]["create_ts"] = "yesterday"
        self.koji.server.handlers["getBuild"] = lambda *args, **kwargs: "no such build"
        result = self.poll(source, cursor)
        self.assertEqual(suffixes(list(result.messages)), ["buildsys.tag"])
        self.assertNotIn("owner", result.messages[0].body)
        self.assertGreater(result.cursor["event"], cursor["event"])

    def test_unpublishable_event_skipped(self) -> None:
        """An event whose message can not be built is skipped with a count; the others go on."""
        source = self.source(builds=False, repos=False)
        cursor = self.start(source)
        bad = self.koji.scratch_build("tasks/1/bad-1-1.src.rpm")
        # base64 data in a request decodes to bytes, which JSON can not carry.
        self.koji.tasks[bad]["request"][-1]["blob"] = b"\xff\x00"
        good = self.koji.scratch_build("tasks/2/good-1-1.src.rpm")
        result = self.poll(source, cursor)
        self.assertEqual([m.body["id"] for m in result.messages], [good])
        self.assertEqual(source.skipped, 1)
        self.koji.set_task_state(good, OPEN)
        later = self.poll(source, result.cursor)
        self.assertEqual([(m.body["id"], m.body["new"]) for m in later.messages], [(good, "OPEN")])

    def test_state_of_wrong_type_skipped(self) -> None:
        """A build or task row whose state is not an integer is skipped, warned and counted once."""
        logged = self.logged()
        source = self.source(tasks="scratch", repos=False)
        cursor = self.start(source)
        bad_build, _ = self.koji.start_build("bad", "1", "1")
        self.koji.builds[bad_build]["state"] = "1"
        flag_build, _ = self.koji.start_build("flag", "1", "1")
        self.koji.builds[flag_build]["state"] = True
        bad_task = self.koji.scratch_build("tasks/1/bad-1-1.src.rpm")
        self.koji.set_task_state(bad_task, CLOSED)
        self.koji.tasks[bad_task]["state"] = None
        good, _ = self.koji.start_build("good", "1", "1")
        first = self.poll(source, cursor)
        self.assertEqual([m.body.get("build_id") for m in first.messages], [good])
        self.assertEqual(source.skipped, 3)
        # Read again within the overlap: neither warned nor counted again.
        second = self.poll(source, first.cursor)
        self.assertEqual(second.messages, [])
        self.assertEqual(source.skipped, 3)
        warnings = [formatEvent(e) for e in logged
                    if e.get("log_level") == LogLevel.warn and e.get("producer") == "koji"]
        self.assertEqual(len(warnings), 3)
        self.assertEqual(sorted(w.split(" event ")[0] for w in warnings),
                         ["Skipping a build", "Skipping a build", "Skipping a task"])
        self.assertTrue(any("'1'" in w and f"build {bad_build}" in w for w in warnings),
                        warnings)
        # Once the hub answers a real state, the row is published.
        self.koji.builds[bad_build]["state"] = COMPLETE
        self.koji.finish_build(good)
        third = self.poll(source, second.cursor)
        self.assertEqual([(m.body["build_id"], m.body["old"], m.body["new"])
                          for m in third.messages],
                         [(bad_build, None, COMPLETE), (good, BUILDING, COMPLETE)])

    def test_skip_warning_hides_the_query(self) -> None:
        """The warning of a skipped event names the hub without its URL's query (which may hold a token)."""
        logged = self.logged()
        source = KojiSource("koji", self.caller,
                            KojiSettings.for_hub(HUB + "?token=s3cret", repos=False), topic)
        cursor = self.start(source)
        bad_build, _ = self.koji.start_build("bad", "1", "1")
        self.koji.builds[bad_build]["state"] = "1"
        self.poll(source, cursor)
        self.assertEqual(source.skipped, 1)
        warnings = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("kojihub", warnings[0])
        self.assertNotIn("s3cret", warnings[0])

    def test_tag_event_of_wrong_type_skipped(self) -> None:
        """A tag history row whose event is not an integer is skipped, warned and counted once."""
        logged = self.logged()
        # The hub's answers with an event id (the original) replaced.
        broken: dict[int, tuple[str, Any]] = {}
        real = self.koji.queryHistory

        def query_history(*args: Any, **kw: Any) -> dict[str, Any]:
            result = real(*args, **kw)
            for row in result["tag_listing"]:
                for field in ("create_event", "revoke_event"):
                    if row[field] in broken and broken[row[field]][0] == field:
                        row[field] = broken[row[field]][1]
            return result

        self.koji.server.handlers["queryHistory"] = query_history
        source = self.source(builds=False, tasks="none", repos=False)
        # Before the first start: read again by the overlap, never published, not warned of.
        broken[self.koji.tag_build(574, "f24")] = ("create_event", "early")
        cursor = self.start(source)
        broken[self.koji.tag_build(574, "f33-build")] = ("create_event", str(self.koji.last_event))
        broken[self.koji.tag_build(574, "destination")] = ("create_event", True)
        broken[self.koji.tag_build(574, "epel8-signing-pending")] = ("create_event", None)
        self.koji.tag_build(574, "f31-updates-pending")
        broken[self.koji.untag_build(574, "f31-updates-pending")] = ("revoke_event", "later")
        self.koji.untag_build(574, "f24")
        first = self.poll(source, cursor)
        self.assertEqual([(suffixes([m])[0], m.body["tag"]) for m in first.messages],
                         [("buildsys.tag", "f31-updates-pending"), ("buildsys.untag", "f24")])
        self.assertEqual(source.skipped, 4)
        # Read again within the overlap: neither warned nor counted again.
        self.koji.event()
        second = self.poll(source, first.cursor)
        self.assertEqual(second.messages, [])
        self.assertEqual(source.skipped, 4)
        warnings = [formatEvent(e) for e in logged
                    if e.get("log_level") == LogLevel.warn and e.get("producer") == "koji"]
        self.assertEqual(sorted(w.split(" event ")[0] for w in warnings),
                         ["Skipping a tag", "Skipping a tag", "Skipping a tag",
                          "Skipping a untag"])
        self.assertTrue(any("'later'" in w and "f31-updates-pending" in w for w in warnings),
                        warnings)
        # What the cursor keeps of them is an event position, as for any other row.
        self.assertTrue(all(isinstance(v, (int, float)) for v in
                            second.cursor["history_seen"].values()))

    def test_repo_state_of_wrong_type_skipped(self) -> None:
        """A repo whose state is not an integer has its repo.done skipped, warned and counted once."""
        logged = self.logged()
        source = self.source(builds=False, tasks="none")
        cursor = self.start(source)
        text = self.koji.new_repo("f24")
        self.koji.repos[text]["state"] = "1"
        flag = self.koji.new_repo("f33-build")
        self.koji.repos[flag]["state"] = True  # == REPO_READY, yet no state
        making = self.koji.new_repo("destination")
        first = self.poll(source, cursor)
        self.assertEqual([(suffixes([m])[0], m.body["repo_id"]) for m in first.messages],
                         [("buildsys.repo.init", text), ("buildsys.repo.init", flag),
                          ("buildsys.repo.init", making)])
        self.assertEqual(source.skipped, 2)
        self.assertEqual(first.cursor["repos"]["pending"], [making])
        # A repo being made whose state turns into a wrong type: skipped once.
        self.koji.repos[making]["state"] = None
        second = self.poll(source, first.cursor)
        third = self.poll(source, second.cursor)
        self.assertEqual(second.messages + third.messages, [])
        self.assertEqual(source.skipped, 3)
        self.assertEqual(third.cursor["repos"], {"next": making + 1, "pending": []})
        warnings = [formatEvent(e) for e in logged
                    if e.get("log_level") == LogLevel.warn and e.get("producer") == "koji"]
        self.assertEqual([w.split(" event ")[0] for w in warnings],
                         ["Skipping a repo.done"] * 3)
        self.assertTrue(any("'1'" in w and f"repo {text}" in w for w in warnings), warnings)
        self.assertTrue(any("None" in w and f"repo {making}" in w for w in warnings), warnings)

    def test_repos_followed_are_bounded(self) -> None:
        """
        The cursor follows at most MAX_PENDING_REPOS repos being made (each
        is looked at every poll): the newest, with a warning.
        """
        from fedhub.producers import koji

        self.patch(koji, "MAX_PENDING_REPOS", 3)
        logged = self.logged()
        source = self.source(builds=False, tasks="none")
        cursor = self.start(source)
        made = [self.koji.new_repo(tag) for tag in ("f24", "f33-build", "destination", "f24", "f33-build")]
        messages, cursor = self.drain(source, cursor)
        self.assertEqual(sorted(m.body["repo_id"] for m in messages), made)
        self.assertEqual(cursor["repos"]["pending"], made[-3:])
        self.assertTrue(any("following the newest 3" in formatEvent(e) for e in logged))

    def test_first_start_reads_repo_rows_strictly(self) -> None:
        """
        At the first start, a repo being made counts only with an integer
        INIT state (False is no state), and a row with a broken id does not
        fail the start.
        """
        source = self.source(builds=False, tasks="none")
        making = self.koji.new_repo("f24")
        flag = self.koji.new_repo("f33-build")
        self.koji.repos[flag]["state"] = False  # == REPO_INIT, yet no state
        broken = self.koji.new_repo("destination")
        self.koji.repos[broken]["id"] = "not a number"
        cursor = self.start(source)
        self.assertEqual(cursor["repos"]["pending"], [making, broken])
        self.assertEqual(cursor["repos"]["next"], broken + 1)

    def test_event_without_a_usable_time(self) -> None:
        """An event whose time is not a number fails the poll with a KojiError naming it."""
        source = self.source()
        cursor = self.start(source)
        last = self.koji.last_event
        for ts in ("yesterday", None, [1], float("nan")):
            self.koji.server.handlers["getLastEvent"] = lambda *a, ts=ts, **k: {"id": last,
                                                                               "ts": ts}
            failure = self.failureResultOf(source.poll(cursor), KojiError)
            self.assertIn(f"event {last}", str(failure.value))
            self.failureResultOf(source.initial_cursor(), KojiError)

    def test_bogus_last_event_does_not_move_the_cursor(self) -> None:
        """
        One answer of getLastEvent far past the hub's events (the event past
        the step and the claimed last one do not exist) fails the poll and
        leaves the cursor; with sane answers again, the tags made meanwhile
        are published.
        """
        source = self.source(tasks="none", repos=False)
        cursor = self.start(source)
        build, _ = self.koji.start_build("a", "1", "1")
        self.koji.finish_build(build)
        real = self.koji.server.handlers["getLastEvent"]
        self.koji.server.handlers["getLastEvent"] = lambda *a, **k: {"id": 10**9, "ts": self.koji.now}
        failure = self.failureResultOf(source.poll(cursor), KojiError)
        self.assertIn(f"last event {10**9} does not exist", str(failure.value))
        self.koji.server.handlers["getLastEvent"] = real
        self.koji.tag_build(build, "f24")
        messages, cursor = self.drain(source, cursor)
        self.assertIn("buildsys.tag", suffixes(messages))
        self.assertEqual(cursor["event"], self.koji.last_event)

    def test_boolean_event_id_refused(self) -> None:
        """An event id that is a boolean is named as not an integer, not taken as 1."""
        source = self.source()
        cursor = self.start(source)
        self.koji.server.handlers["getLastEvent"] = lambda *a, **k: {"id": True, "ts": self.koji.now}
        failure = self.failureResultOf(source.poll(cursor), KojiError)
        self.assertIn("the hub's event id is not an integer: True", str(failure.value))

    def test_first_start_far_ahead_refused(self) -> None:
        """
        A first start from an event dated more than a day past this host's
        clock fails (it would be the floor for good); an hour ahead is
        taken.
        """
        clock = Clock()
        clock.advance(self.koji.now - 2 * 86400)
        source = KojiSource("koji", self.caller, KojiSettings.for_hub(HUB), topic, clock=clock)
        failure = self.failureResultOf(source.initial_cursor(), KojiError)
        self.assertIn("more than a day ahead of this host's clock", str(failure.value))
        clock.advance(2 * 86400 - 3600)
        self.assertEqual(self.start(source)["event"], self.koji.last_event)

    def test_row_far_in_the_future(self) -> None:
        """A row with an absurd future time is published but does not move its stream out of reach."""
        source = self.source(tasks="none", repos=False)
        cursor = self.start(source)
        bad, _ = self.koji.start_build("bad", "1", "1")
        self.koji.builds[bad]["creation_ts"] = 4102444800.0  # 2100-01-01
        self.koji.event()
        first = self.poll(source, cursor)
        self.assertEqual([m.body["build_id"] for m in first.messages], [bad])
        self.assertLess(first.cursor["builds"]["created"], self.koji.now + 3600)
        later, _ = self.koji.start_build("later", "1", "1")
        self.koji.finish_build(later)
        self.koji.event()
        second = self.poll(source, first.cursor)
        self.assertEqual([(m.body["build_id"], m.body["new"]) for m in second.messages],
                         [(later, COMPLETE)])
        self.assertEqual(self.poll(source, second.cursor).messages, [])

    def test_position_past_now_pulled_back(self) -> None:
        """A stream position already far in the future is pulled back to the hub's now."""
        source = self.source(tasks="none", repos=False)
        cursor = self.start(source)
        cursor["builds"]["created"] = 4102444800.0
        build, _ = self.koji.start_build("a", "1", "1")
        self.koji.event()
        first = self.poll(source, cursor)
        self.assertEqual(first.cursor["builds"]["created"], self.koji.events[-1][1])
        self.assertEqual([m.body["build_id"] for m in self.poll(source, first.cursor).messages],
                         [build])

    def test_clock_extends_now(self) -> None:
        """With a clock, rows up to its time move the streams though the hub had no event since."""
        clock = Clock()
        clock.advance(self.koji.now + 7200)
        source = KojiSource("koji", self.caller, KojiSettings.for_hub(HUB, tasks="none",
                                                                      repos=False), topic, clock)
        cursor = self.start(source)
        build, _ = self.koji.start_build("a", "1", "1")
        self.koji.builds[build]["creation_ts"] = self.koji.now + 3600
        result = self.poll(source, cursor)
        self.assertEqual(result.cursor["builds"]["created"], self.koji.now + 3600)
        self.assertLess(self.poll(self.source(tasks="none", repos=False), cursor)
                        .cursor["builds"]["created"], self.koji.now + 3600)

    def test_rows_of_one_time_across_a_full_page(self) -> None:
        """
        Rows written in one transaction share its time; a page boundary
        among them loses none (Koji asks for times strictly after the one
        given), and more rows of one time than a page are read with wider
        pages.
        """
        source = self.source(tasks="none", repos=False, tags=False, page_size=3)
        cursor = self.start(source)
        self.koji.now += 10
        self.koji.step = 0.0
        together = [self.koji.start_build(f"p{i}", "1", "1")[0] for i in range(5)]
        self.koji.step = 1.0
        self.koji.tick()
        later = [self.koji.start_build(f"q{i}", "1", "1")[0] for i in range(2)]
        self.koji.event()
        messages, cursor = self.drain(source, cursor)
        self.assertEqual(sorted(m.body["build_id"] for m in messages), together + later)
        self.assertNotIn("limits", cursor["builds"])
        # Mixed times: the page's last time is read again.
        self.koji.now += 10
        mixed = [self.koji.start_build(f"r{i}", "1", "1")[0] for i in range(2)]
        self.koji.step = 0.0
        mixed += [self.koji.start_build(f"s{i}", "1", "1")[0] for i in range(3)]
        self.koji.step = 1.0
        self.koji.event()
        messages, _ = self.drain(source, cursor)
        self.assertEqual(sorted(m.body["build_id"] for m in messages), mixed)

    def test_child_tasks_of_one_time_across_a_full_page(self) -> None:
        """Child tasks created with their parent's transaction, more than a page: all published."""
        source = self.source(builds=False, repos=False, tags=False, tasks="all", page_size=4)
        cursor = self.start(source)
        self.koji.now += 10
        parent = self.koji._new_task("build", ["x.src.rpm", "f24", {}], OPEN)
        self.koji.now += 1
        children = []
        for arch in ("x86_64", "aarch64", "ppc64le", "s390x", "i686", "noarch"):
            task_id = self.koji.next_task
            self.koji.next_task += 1
            self.koji.tasks[task_id] = self.koji._task_row(
                task_id, "buildArch", ["x.src.rpm", 1, arch], 0, parent=parent, arch=arch)
            children.append(task_id)
        self.koji.now += 1
        self.koji.event()
        messages, _ = self.drain(source, cursor)
        self.assertEqual(sorted(m.body["id"] for m in messages), sorted([parent] + children))

    def recycle(self, build: int) -> None:
        """Build a failed build's NVR again: Koji gives it its row back."""
        event = self.koji.event()
        self.koji.builds[build].update(
            state=BUILDING, creation_event_id=event, creation_ts=self.koji.now,
            creation_time=koji_time(self.koji.now), completion_ts=None, completion_time=None)

    def test_recycled_build_within_the_overlap(self) -> None:
        """
        A failed build built again 30 s later (Koji recycles its row: same
        build id, new creation event) gets its new states published, with
        message ids of their own.
        """
        source = self.source(tasks="none", repos=False, tags=False)
        cursor = self.start(source)
        build, _ = self.koji.start_build("foo", "1.0", "1.fc42")
        self.koji.finish_build(build, FAILED)
        self.koji.tick()
        self.koji.event()
        one = self.poll(source, cursor)
        self.koji.now += 30
        self.recycle(build)
        two = self.poll(source, one.cursor)
        self.koji.now += 30
        self.koji.finish_build(build, FAILED)
        self.koji.tick()
        self.koji.event()
        three = self.poll(source, two.cursor)
        states = [[(m.body["old"], m.body["new"]) for m in r.messages] for r in (one, two, three)]
        self.assertEqual(states, [[(None, FAILED)], [(None, BUILDING)], [(BUILDING, FAILED)]])
        self.assertNotEqual(one.messages[0].id, three.messages[0].id)
        # The same attempt polled again keeps its ids.
        again = self.poll(self.source(tasks="none", repos=False, tags=False), two.cursor)
        self.assertEqual([m.id for m in again.messages], [m.id for m in three.messages])

    def test_window_too_large_for_the_cap_halved(self) -> None:
        """
        A window of history whose answer passes the client's size cap (a
        tag cloned in one go) fails that poll, naming the window; the next
        polls read half as many events at a time, and event_step again once
        windows go through.
        """
        source = self.source(builds=False, tasks="none", repos=False, event_step=100)
        cursor = self.start(source)
        start = cursor["event"]
        for _ in range(400):
            self.koji.event()
        too_large = ResponseTooLarge(HUB, "multiCall", 1000, 2000)
        caller = self.caller

        def fail_once(calls: Any, batch_size: int = 100) -> Any:
            del caller.multicall  # back to the class's
            return fail(too_large)

        def answer_too_large() -> None:
            caller.multicall = fail_once  # type: ignore[method-assign]

        answer_too_large()
        error = self.failureResultOf(source.poll(cursor), KojiError).value
        self.assertEqual(error.reason, f"the answer for events {start + 1}..{start + 100} is "
                         "larger than 1000 bytes; reading 50 events at a time until it passes")
        answer_too_large()
        self.failureResultOf(source.poll(cursor), KojiError)
        result = self.poll(source, cursor)
        self.assertEqual(result.cursor["event"], start + 25)
        result = self.poll(source, result.cursor)
        self.assertEqual(result.cursor["event"], start + 25 + 50)
        result = self.poll(source, result.cursor)
        self.assertEqual(result.cursor["event"], start + 75 + 100)
        # One event alone too large: only a larger cap helps.
        one = self.source(builds=False, tasks="none", repos=False, event_step=1)
        answer_too_large()
        error = self.failureResultOf(one.poll(result.cursor), KojiError).value
        self.assertIn("alone is larger than 1000 bytes: raise max_response_bytes", error.reason)

    def test_seen_table_bounded_when_tasks_finish_between_polls(self) -> None:
        """
        On a hub whose tasks all finish between two polls, the streams of
        unfinished tasks get no rows; they still move, so the seen table
        keeps about the overlap's worth of keys.
        """
        source = self.source(builds=False, repos=False, tags=False, tasks="parents")
        cursor = self.start(source)
        sizes = []
        for _ in range(30):
            self.koji.now += 60
            task = self.koji._new_task("createrepo", ["f24", {}], OPEN)
            self.koji.set_task_state(task, CLOSED)
            self.koji.event()
            result = self.poll(source, cursor)
            self.assertEqual(len(result.messages), 1)
            cursor = result.cursor
            sizes.append(len(cursor["tasks"]["seen"]))
        self.assertLessEqual(max(sizes[5:]), 4)

    def test_full_page_beyond_now(self) -> None:
        """A full page that ends beyond the hub's now does not page on for ever; later rows come."""
        source = self.source(tasks="none", repos=False, page_size=2)
        cursor = self.start(source)
        builds = [self.koji.start_build(f"p{i}", "1", "1")[0] for i in range(4)]
        for build in builds[2:]:
            self.koji.builds[build]["creation_ts"] = 1e30
        self.koji.event()
        messages, cursor = self.drain(source, cursor)
        self.assertEqual(sorted(m.body["build_id"] for m in messages), builds[:2])
        # No time in 1e30 s can be written: such a row is skipped.  (The page
        # with the first of them ends the paging, and the second may never
        # be read: a page's last time is read again, and the pages fall
        # differently.)
        self.assertGreaterEqual(source.skipped, 1)
        later, _ = self.koji.start_build("later", "1", "1")
        self.koji.event()
        messages, _ = self.drain(source, cursor)
        self.assertEqual([m.body["build_id"] for m in messages], [later])

    def test_hub_going_backwards(self) -> None:
        """A hub whose last event is before the cursor publishes nothing and keeps the cursor."""
        source = self.source()
        cursor = self.start(source)
        cursor = dict(cursor, event=cursor["event"] + 100)
        events = self.logged()
        result = self.poll(source, cursor)
        self.assertEqual(result.messages, [])
        self.assertEqual(result.cursor["event"], cursor["event"])
        # Said once while it lasts, however many polls it takes, and once
        # when it is over.
        for _ in range(3):
            result = self.poll(source, result.cursor)
        behind = [e for e in events if "before the cursor" in formatEvent(e)]
        self.assertEqual([e["log_level"] for e in behind], [LogLevel.warn])
        for _ in range(100):
            self.koji.event()
        build, _ = self.koji.start_build("after-the-restore", "1", "1")
        self.koji.event()
        messages, _ = self.drain(source, result.cursor)
        self.assertIn(build, [m.body.get("build_id") for m in messages])
        self.assertEqual(len([e for e in events if "reached the cursor" in formatEvent(e)]), 1)


class SchemaTests(SynchronousTestCase):
    """
    The schema names and the validation used by these tests.
    """

    def test_schema_names_installed(self) -> None:
        """Every schema name the poller uses is an installed fedora.messages entry point."""
        self.assertLessEqual(set(SCHEMAS.values()), schema_names())

    def test_validation_catches_bad_bodies(self) -> None:
        """The validation used here rejects a body that breaks the schema."""
        import jsonschema

        message = Message.create(topic("buildsys.tag"), {"tag_id": "six"},
                                 schema=SCHEMAS["buildsys.tag"])
        self.assertRaises(jsonschema.ValidationError, check_with_schema_package, message)

    def test_fedora_bodies_validate(self) -> None:
        """The real Fedora bodies of the samples validate (the checker is not too strict)."""
        for sample in koji_bodies():
            if sample["topic"] in SCHEMAS:
                check_with_schema_package(Message.create(
                    topic(sample["topic"]), sample["body"], schema=SCHEMAS[sample["topic"]]))

    def test_same_keys_as_fedora(self) -> None:
        """Published bodies have every key Fedora's plugin sends for the same event kind."""
        koji = FakeKoji()
        caller = DirectCaller(koji.server, HUB, multicall_method="multiCall")
        source = KojiSource("koji", caller, KojiSettings.for_hub(HUB, tasks="all"), topic)
        cursor = self.successResultOf(source.initial_cursor())
        build, _ = koji.start_build("a", "1", "1")
        koji.finish_build(build)
        koji.tag_build(build, "f24")
        koji.untag_build(build, "f24")
        task = koji.scratch_build("x.src.rpm")
        koji.set_task_state(task, OPEN)
        koji.repo_state(koji.new_repo("f24"), REPO_READY)
        result: PollResult = self.successResultOf(source.poll(cursor))
        published = {m.topic[len(PREFIX):]: set(m.body) for m in result.messages}
        for sample in koji_bodies():
            if sample["topic"] in published and sample["topic"] != "buildsys.package.list.change":
                missing = set(sample["body"]) - published[sample["topic"]]
                self.assertEqual(missing, set(), sample["topic"])


    def test_fedora_message_classes_read_them(self) -> None:
        """
        fedora-messaging's Koji message classes take the published messages
        and format them: a task's info carries the build host's name, from
        getHost (asked once per host), as Fedora's plugin sends it; the task
        info of every sample has the same keys as Fedora's.
        """
        from fedora_messaging import message as fm_message

        koji = FakeKoji()
        koji.hosts[1] = "buildhw-x86-13.iad2.fedoraproject.org"
        caller = DirectCaller(koji.server, HUB, multicall_method="multiCall")
        source = KojiSource("koji", caller, KojiSettings.for_hub(HUB, tasks="all"), topic)
        cursor = self.successResultOf(source.initial_cursor())
        build, _ = koji.start_build("a", "1", "1")
        koji.finish_build(build)
        task = koji.scratch_build("x.src.rpm")
        koji.set_task_state(task, OPEN)
        result: PollResult = self.successResultOf(source.poll(cursor))
        seen = set()
        for message in result.messages:
            kind = message.topic[len(PREFIX):]
            if kind not in ("buildsys.build.state.change", "buildsys.task.state.change"):
                continue
            info = message.body["task"] if kind.startswith("buildsys.build") else message.body["info"]
            if info is None:
                continue
            (theirs,) = fm_message.loads(dump_line(message))
            self.assertNotEqual(type(theirs), fm_message.Message, kind)
            text = str(theirs)
            if info["host_id"] == 1:
                self.assertEqual(info["host_name"], "buildhw-x86-13.iad2.fedoraproject.org")
                seen.add(kind)
            else:
                self.assertIsNone(info["host_name"])
            self.assertTrue(text)
        self.assertEqual(seen, {"buildsys.build.state.change", "buildsys.task.state.change"})
        for sample in koji_bodies():
            info = sample["body"].get("task") or sample["body"].get("info")
            if isinstance(info, dict):
                self.assertIn("host_name", info)


class PluginTests(SynchronousTestCase):
    """
    The C{koji} plugin.
    """

    def test_plugin(self) -> None:
        """The plugin provides IProducerPlugin and builds a polling service without I/O."""
        plugin = KojiPlugin()
        self.assertTrue(verifyObject(IProducerPlugin, plugin))
        options = {name: option.default for name, option in plugin.options.items()}
        options["hub_url"] = HUB
        context = PluginContext("koji", "infra", options, FakePublisher(), Clock(),
                                HubSettings(state_dir=self.mktemp(), environment="test"))
        service = plugin.build(context)
        self.assertIsInstance(service, PollingService)
        self.assertEqual(service.interval, 30.0)
        self.assertEqual(service.store.path, os.path.join(context.state_dir, "cursor.json"))
        source = service.source
        assert isinstance(source, KojiSource)
        self.assertEqual(source.topic("buildsys.tag"), "org.fedoraproject.test.buildsys.tag")
        assert isinstance(source.client, XMLRPCClient)
        self.assertEqual(source.client.multicall_method, "multiCall")
        self.assertFalse(os.path.exists(context.state_dir))


class EndToEndTests(TestCase):
    """
    The whole poller over a real loopback socket: crash recovery and a hub
    that misbehaves.
    """

    def setUp(self) -> None:
        self.koji = FakeKoji()
        port, self.url = listen(self.koji.server, reactor)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.koji.server.release_hanging)
        self.state_dir = self.mktemp()

    def service(self, publisher: FakePublisher, **client: Any) -> PollingService:
        client.setdefault("timeout", 5.0)
        source = KojiSource("koji", XMLRPCClient(self.url, reactor, multicall_method="multiCall",
                                                 **client),
                            KojiSettings.for_hub(self.url), topic)
        service = PollingService("koji", source, publisher, reactor, self.state_dir,
                                 interval=0.05, backoff=0.01, max_backoff=0.05, jitter=0.0,
                                 run_in_thread=run_inline)
        return service

    @inlineCallbacks
    def wait_for(self, predicate: Callable[[], bool], what: str) -> Any:
        for _ in range(1000):
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def test_crash_between_poll_and_publish(self) -> Any:
        """
        A poller that dies before its messages are handed over is replaced
        by one that publishes them again, with the same ids, and then the
        rest: no gap, one poll's duplicates.
        """
        hung = FakePublisher(auto=False)
        first = self.service(hung)
        first.startService()
        self.addCleanup(first.source.close)
        yield self.wait_for(lambda: first.cursor is not None, "the first cursor")
        build, _ = self.koji.start_build("a", "1", "1")
        self.koji.tag_build(build, "f24")
        # A poll in flight while the build is made may see only the build;
        # either way the first poller then hangs on that poll's hand-over.
        yield self.wait_for(lambda: len(hung.messages) >= 1, "the first messages")
        # Crash: the first poller is abandoned with its hand-overs pending.
        first.running = False
        yield first.source.close()
        pending = [m.id for m in hung.messages]
        self.koji.tag_build(build, "f31-updates-pending")
        publisher = FakePublisher()
        second = self.service(publisher)
        second.startService()
        self.addCleanup(second.stopService)
        yield self.wait_for(lambda: len(publisher.messages) == 3, "the second messages")
        self.assertEqual([m.id for m in publisher.messages[:len(pending)]], pending)
        self.assertEqual(suffixes(publisher.messages),
                         ["buildsys.build.state.change", "buildsys.tag", "buildsys.tag"])
        self.assertEqual(publisher.messages[2].body["tag"], "f31-updates-pending")
        for message in publisher.messages:
            check_with_schema_package(message)

    @inlineCallbacks
    def test_misbehaving_hub(self) -> Any:
        """
        Faults, HTTP errors, broken XML, a huge answer and a hub that never
        answers are counted as errors, and polling goes on to publish what
        happened meanwhile.
        """
        publisher = FakePublisher()
        service = self.service(publisher, timeout=0.5, max_response_bytes=256 * 1024)
        service.startService()
        self.addCleanup(service.stopService)
        yield self.wait_for(lambda: service.polls >= 1, "a first poll")
        self.koji.server.misbehave = ["fault", "http500", "truncated", "billion_laughs",
                                      "huge", "hang", "not_xml"]
        self.koji.tag_build(574, "f24")
        yield self.wait_for(lambda: len(publisher.messages) == 1, "the tag message")
        self.assertEqual(service.errors, 7)
        self.assertEqual(service.consecutive_errors, 0)
        self.assertLess(self.koji.server.flood_sent, 32 * 1024 * 1024)
        self.assertEqual(suffixes(publisher.messages), ["buildsys.tag"])
        self.flushLoggedErrors()


