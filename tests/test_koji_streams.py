"""
Tests for L{fedhub.producers.koji}: a kind of event (builds, tasks, repos)
switched on after the first start starts from the hub's present, as the
poller does at its first start, so do the tasks a wider C{tasks} choice
adds, and cursors of earlier versions go on where they were.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from fedhub.message import Message
from fedhub.producers.koji import KojiError, KojiSettings, KojiSource
from fedhub.producers.poller import ForeignCursor
from tests.fakes_xmlrpc import CLOSED, COMPLETE, OPEN, REPO_READY
from tests.test_koji_poller import HUB, SourceTestBase, suffixes, topic

ALL_OFF: dict[str, Any] = {"tags": False, "builds": False, "tasks": "none", "repos": False}


class SwitchedOnLaterTests(SourceTestBase):
    """
    Kinds switched on in the configuration of a poller that already has a
    cursor.
    """

    def busy_day(self, hours: int = 10) -> dict[str, list[int]]:
        """
        An hour apart each: a build started and finished, a scratch build's
        task opened and closed, a tag, a repo made and ready.

        @return: The builds, tasks and repos made, by kind.
        """
        made: dict[str, list[int]] = {"builds": [], "tasks": [], "repos": []}
        step, self.koji.step = self.koji.step, 600.0
        for i in range(hours):
            build, _ = self.koji.start_build(f"day{i}", "1", "1")
            self.koji.finish_build(build)
            task = self.koji.scratch_build(f"day{i}.src.rpm")
            self.koji.set_task_state(task, OPEN)
            self.koji.set_task_state(task, CLOSED)
            self.koji.tag_build(build, "f24")
            repo = self.koji.new_repo("f24")
            self.koji.repo_state(repo, REPO_READY)
            made["builds"].append(build)
            made["tasks"].append(task)
            made["repos"].append(repo)
        self.koji.step = step
        return made

    def run_with(self, cursor: Any, **settings: Any) -> tuple[list[Message], Any]:
        """
        Poll with C{settings} (over all kinds off) until nothing is left.
        """
        return self.drain(self.source(**{**ALL_OFF, **settings}), cursor)

    def test_builds_switched_on_later(self) -> None:
        """
        Builds off at the first start and switched on later publish what
        happens from then on, not the builds made since the first start,
        nor those just before the switch that the overlap reads again.
        """
        cursor = self.start(self.source(**ALL_OFF))
        _, cursor = self.run_with(cursor)
        self.busy_day()
        _, cursor = self.run_with(cursor)
        self.koji.finish_build(self.koji.start_build("just-before", "1", "1")[0])
        switched = self.koji.event()
        events = self.logged()
        messages, cursor = self.run_with(cursor, builds=True)
        self.assertEqual(messages, [])
        build, _ = self.koji.start_build("after", "1", "1")
        self.koji.finish_build(build)
        messages, _ = self.run_with(cursor, builds=True)
        self.assertEqual([(m.body["build_id"], m.body["new"]) for m in messages],
                         [(build, COMPLETE)])
        lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.info]
        self.assertEqual(
            lines, ["Switched on since the last poll: publishing builds of "
                    f"{HUB} from now (event {switched})"])

    def test_tasks_switched_on_later(self) -> None:
        """
        Tasks (C{tasks = "none"} at the first start) switched on later
        publish what happens from then on.
        """
        cursor = self.start(self.source(**ALL_OFF))
        self.busy_day()
        _, cursor = self.run_with(cursor)
        self.koji.scratch_build("just-before.src.rpm")
        self.koji.event()
        messages, cursor = self.run_with(cursor, tasks="scratch")
        self.assertEqual(messages, [])
        task = self.koji.scratch_build("after.src.rpm")
        messages, _ = self.run_with(cursor, tasks="scratch")
        self.assertEqual([(m.body["id"], m.body["new"]) for m in messages], [(task, "FREE")])

    def test_tags_switched_on_later(self) -> None:
        """
        Tags off at the first start and switched on later publish the tags
        and untags from then on, not those of the events just before the
        switch that the overlap reads again.
        """
        cursor = self.start(self.source(**ALL_OFF))
        self.busy_day(3)
        _, cursor = self.run_with(cursor)
        self.koji.tag_build(574, "destination")
        self.koji.untag_build(574, "destination")
        self.koji.event()
        messages, cursor = self.run_with(cursor, tags=True)
        self.assertEqual(messages, [])
        self.koji.tag_build(574, "destination")
        messages, _ = self.run_with(cursor, tags=True)
        self.assertEqual([(suffixes([m])[0], m.body["tag"]) for m in messages],
                         [("buildsys.tag", "destination")])

    def test_repos_switched_on_later(self) -> None:
        """
        Repos off at the first start and switched on later are found from
        the newest finished newRepo task: a repo being made at the switch
        gets its repo.done, not its init, and the repos made while they
        were off are neither published nor looked at.
        """
        cursor = self.start(self.source(**ALL_OFF))
        self.busy_day()
        building = self.koji.new_repo("f24")
        _, cursor = self.run_with(cursor)
        messages, cursor = self.run_with(cursor, repos=True)
        self.assertEqual(messages, [])
        self.assertEqual(cursor["repos"], {"next": building + 1, "pending": [building]})
        self.koji.repo_state(building, REPO_READY)
        new = self.koji.new_repo("f33-build")
        messages, _ = self.run_with(cursor, repos=True)
        self.assertEqual([(suffixes([m])[0], m.body["repo_id"]) for m in messages],
                         [("buildsys.repo.init", new), ("buildsys.repo.done", building)])

    def test_switch_saved_before_anything_read(self) -> None:
        """
        The first poll after a switch publishes nothing and only records
        the switch (and asks for the next poll at once), so the switch is
        saved before any message from it needs handing over: what comes
        after it is published by the polls that follow, whatever becomes of
        their messages.
        """
        cursor = self.start(self.source(**ALL_OFF))
        self.busy_day(2)
        _, cursor = self.run_with(cursor)
        on = {**ALL_OFF, "tags": True, "builds": True, "repos": True}
        switch = self.poll(self.source(**on), cursor)
        self.assertEqual((switch.messages, switch.more), ([], True))
        self.assertEqual(switch.cursor["streams"], ["tags", "builds", "repos"])
        build, _ = self.koji.start_build("after-switch", "1", "1")
        self.koji.finish_build(build)
        self.koji.tag_build(574, "destination")
        repo = self.koji.new_repo("f24")
        # The next poll's messages are not handed over (say the publisher
        # pushed back): the poll after it, from the same cursor, has them.
        self.poll(self.source(**on), switch.cursor)
        messages, _ = self.run_with(switch.cursor, tags=True, builds=True, repos=True)
        self.assertEqual(
            sorted((suffixes([m])[0], m.body.get("repo_id") or m.body.get("tag")
                    or m.body.get("build_id")) for m in messages),
            sorted([("buildsys.build.state.change", build), ("buildsys.tag", "destination"),
                    ("buildsys.repo.init", repo)]))

    def test_switched_off_and_on_again(self) -> None:
        """
        Kinds switched off and on again start from now too: nothing of the
        time they were off, not even the end of a repo that was being made
        when they were switched off.
        """
        source = self.source(tags=False, tasks="all")
        cursor = self.start(source)
        building = self.koji.new_repo("f24")
        open_build, _ = self.koji.start_build("open", "1", "1")
        messages, cursor = self.drain(source, cursor)
        self.assertEqual(len(messages), 4)  # the repo, the build, their tasks
        self.assertEqual(cursor["repos"]["pending"], [building])
        _, cursor = self.run_with(cursor)
        self.busy_day()
        self.koji.repo_state(building, REPO_READY)
        self.koji.finish_build(open_build)
        self.koji.event()
        _, cursor = self.run_with(cursor)
        messages, cursor = self.drain(source, cursor)
        self.assertEqual(messages, [])
        build, _ = self.koji.start_build("after", "1", "1")
        repo = self.koji.new_repo("f24")
        messages, _ = self.drain(source, cursor)
        self.assertEqual(
            sorted((suffixes([m])[0], m.body.get("build_id") or m.body.get("repo_id")
                    or m.body["id"]) for m in messages),
            sorted([("buildsys.build.state.change", build), ("buildsys.repo.init", repo),
                    ("buildsys.task.state.change", self.koji.builds[build]["task_id"]),
                    ("buildsys.task.state.change", self.koji.repos[repo]["task_id"])]))

    def test_kinds_already_on_go_on(self) -> None:
        """
        Switching one kind on leaves the others where they were: what they
        had not read yet is published.
        """
        source = self.source(**{**ALL_OFF, "tasks": "scratch", "repos": True})
        cursor = self.start(source)
        _, cursor = self.drain(source, cursor)
        task = self.koji.scratch_build("meanwhile.src.rpm")
        repo = self.koji.new_repo("f24")
        messages, _ = self.run_with(cursor, tasks="scratch", repos=True, builds=True)
        self.assertEqual([(suffixes([m])[0], m.body.get("id") or m.body.get("repo_id"))
                          for m in messages],
                         [("buildsys.task.state.change", task), ("buildsys.repo.init", repo)])

    def test_switched_on_far_ahead_refused(self) -> None:
        """
        A kind is not switched on from an event dated more than a day past
        this host's clock (it would be its floor for good), as at a first
        start: the poll fails, and the kind starts once the clocks agree.
        """
        cursor = self.start(self.source(**ALL_OFF))
        clock = Clock()
        clock.advance(self.koji.now - 2 * 86400)
        source = KojiSource("koji", self.caller,
                            KojiSettings.for_hub(HUB, **{**ALL_OFF, "builds": True}), topic,
                            clock=clock)
        failure = self.failureResultOf(source.poll(cursor), KojiError)
        self.assertIn("more than a day ahead of this host's clock", str(failure.value))
        clock.advance(2 * 86400)
        self.assertEqual(self.poll(source, cursor).cursor["streams"], ["builds"])


class TasksWidenedTests(SourceTestBase):
    """
    The C{tasks} choice of a poller that already has a cursor made wider or
    narrower, tasks staying on.
    """

    def run_with(self, cursor: Any, tasks: str) -> tuple[list[Message], Any]:
        """
        Poll for C{tasks} alone until nothing is left.
        """
        return self.drain(self.source(**{**ALL_OFF, "tasks": tasks}), cursor)

    def changes(self, messages: list[Message]) -> list[tuple[int, str]]:
        return sorted((m.body["id"], m.body["new"]) for m in messages)

    def test_widened_scratch_to_all(self) -> None:
        """
        Tasks widened from scratch builds' to all: the other tasks' changes
        of before the change are not published, even though the overlap
        reads them again, their changes after it are, and the scratch
        builds' tasks that changed while the poller was stopped still are.
        The first poll only records the change.
        """
        cursor = self.start(self.source(**{**ALL_OFF, "tasks": "scratch"}))
        _, overlapped = self.koji.start_build("overlapped", "1", "1")
        self.koji.event()
        messages, cursor = self.run_with(cursor, "scratch")
        self.assertEqual(messages, [])
        # While the poller is stopped:
        _, stopped = self.koji.start_build("stopped", "1", "1")
        child = self.koji.child_task(stopped)
        scratch = self.koji.scratch_build("meanwhile.src.rpm")
        widened_at = self.koji.event()
        events = self.logged()
        widening = self.poll(self.source(**{**ALL_OFF, "tasks": "all"}), cursor)
        self.assertEqual((widening.messages, widening.more), ([], True))
        self.assertEqual(widening.cursor["tasks"]["choice"], "all")
        self.assertEqual(widening.cursor["tasks"]["widened"],
                         {"parents": self.koji.now, "all": self.koji.now})
        messages, cursor = self.run_with(widening.cursor, "all")
        self.assertEqual(self.changes(messages), [(scratch, "FREE")])
        _, after = self.koji.start_build("after", "1", "1")
        self.koji.set_task_state(overlapped, CLOSED)
        self.koji.set_task_state(child, OPEN)
        messages, _ = self.run_with(cursor, "all")
        self.assertEqual(self.changes(messages),
                         sorted([(overlapped, "CLOSED"), (child, "OPEN"), (after, "OPEN")]))
        lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.info]
        self.assertEqual(lines, ["Tasks widened since the last poll from scratch to all: the "
                                 f"tasks of {HUB} that all adds are published from now "
                                 f"(event {widened_at})"])

    def test_widening_saved_before_anything_read(self) -> None:
        """
        The widening is saved before anything is read from it: a poll after
        it whose messages are not handed over is read again from the same
        floor, however far the hub has moved on.
        """
        source = self.source(**{**ALL_OFF, "tasks": "parents"})
        cursor = self.start(source)
        widening = self.poll(self.source(**{**ALL_OFF, "tasks": "all"}), cursor)
        self.assertEqual((widening.messages, widening.more), ([], True))
        _, parent = self.koji.start_build("after", "1", "1")
        child = self.koji.child_task(parent)
        self.koji.event()
        lost = self.poll(self.source(**{**ALL_OFF, "tasks": "all"}), widening.cursor)
        self.assertEqual(self.changes(lost.messages), [(parent, "OPEN"), (child, "FREE")])
        self.koji.tick()
        self.koji.event()
        messages, _ = self.run_with(widening.cursor, "all")
        self.assertEqual(self.changes(messages), [(parent, "OPEN"), (child, "FREE")])

    def test_narrowed_then_widened_again(self) -> None:
        """
        A narrower choice stops publishing the tasks it leaves out at once,
        and drops their floors; widened again, the tasks it adds then start
        from then, step by step, while the ones already published lose
        nothing.
        """
        cursor = self.start(self.source(**{**ALL_OFF, "tasks": "scratch"}))
        messages, cursor = self.run_with(cursor, "all")
        self.assertEqual((messages, sorted(cursor["tasks"]["widened"])), ([], ["all", "parents"]))
        _, parent = self.koji.start_build("p", "1", "1")
        child = self.koji.child_task(parent)
        messages, cursor = self.run_with(cursor, "all")
        self.assertEqual(self.changes(messages), [(parent, "OPEN"), (child, "FREE")])
        # Narrowed to scratch builds' tasks: at once, no poll of its own.
        self.koji.set_task_state(child, OPEN)
        scratch = self.koji.scratch_build("s.src.rpm")
        self.koji.event()
        narrowed = self.poll(self.source(**{**ALL_OFF, "tasks": "scratch"}), cursor)
        self.assertEqual(self.changes(narrowed.messages), [(scratch, "FREE")])
        self.assertEqual(narrowed.cursor["tasks"]["choice"], "scratch")
        self.assertNotIn("widened", narrowed.cursor["tasks"])
        _, cursor = self.run_with(narrowed.cursor, "scratch")
        # Changed while scratch builds' tasks alone were published, read
        # again by the overlap once widened to all parent tasks: a floor
        # newer than the first widening's keeps them out.
        _, quiet = self.koji.start_build("q", "1", "1")
        self.koji.set_task_state(child, CLOSED)
        self.koji.event()
        messages, cursor = self.run_with(cursor, "parents")
        self.assertEqual(messages, [])
        self.assertEqual(cursor["tasks"]["widened"], {"parents": self.koji.now})
        self.koji.set_task_state(quiet, CLOSED)
        messages, cursor = self.run_with(cursor, "parents")
        self.assertEqual(self.changes(messages), [(quiet, "CLOSED")])
        # Widened to all while stopped: the parent tasks go on from where
        # they were, the child tasks start from now.
        parents_floor = cursor["tasks"]["widened"]["parents"]
        self.koji.set_task_state(parent, CLOSED)
        late = self.koji.child_task(parent)
        self.koji.event()
        messages, cursor = self.run_with(cursor, "all")
        self.assertEqual([(m.body["id"], m.body["old"], m.body["new"]) for m in messages],
                         [(parent, "OPEN", "CLOSED")])
        self.assertEqual(cursor["tasks"]["widened"],
                         {"parents": parents_floor, "all": self.koji.now})
        self.koji.set_task_state(late, OPEN)
        messages, _ = self.run_with(cursor, "all")
        self.assertEqual(self.changes(messages), [(late, "OPEN")])

    def test_widened_far_ahead_refused(self) -> None:
        """
        The tasks a wider choice adds do not start from an event dated more
        than a day past this host's clock (it would be their floor for
        good): the poll fails, and they start once the clocks agree.
        """
        cursor = self.start(self.source(**{**ALL_OFF, "tasks": "scratch"}))
        clock = Clock()
        clock.advance(self.koji.now - 2 * 86400)
        source = KojiSource("koji", self.caller,
                            KojiSettings.for_hub(HUB, **{**ALL_OFF, "tasks": "parents"}), topic,
                            clock=clock)
        failure = self.failureResultOf(source.poll(cursor), KojiError)
        self.assertIn("more than a day ahead of this host's clock", str(failure.value))
        clock.advance(2 * 86400)
        self.assertEqual(self.poll(source, cursor).cursor["tasks"]["widened"],
                         {"parents": self.koji.now})


class UpgradeTests(SourceTestBase):
    """
    Cursors saved by versions that did not record which kinds were on.
    """

    def test_cursor_of_earlier_version(self) -> None:
        """
        A cursor without the kinds that were on, saved with every kind on,
        goes on where it was: what happened since is published once, and
        nothing of before again.
        """
        source = self.source(tasks="all")
        cursor = self.start(source)
        build, _ = self.koji.start_build("before", "1", "1")
        repo = self.koji.new_repo("f24")
        self.koji.tag_build(574, "f24")
        before, cursor = self.drain(source, cursor)
        # The cursor file as the earlier version wrote it.
        cursor.pop("streams", None)
        self.assertEqual(sorted(cursor), ["builds", "event", "event_ts", "floor_event",
                                          "floor_ts", "history_seen", "repos", "tasks"])
        cursor = json.loads(json.dumps(cursor))
        self.koji.finish_build(build)
        self.koji.repo_state(repo, REPO_READY)
        self.koji.untag_build(574, "f24")
        task = self.koji.scratch_build("since.src.rpm")
        after, cursor = self.drain(self.source(tasks="all"), cursor)
        self.assertEqual(cursor["streams"], ["tags", "builds", "tasks", "repos"])
        self.assertFalse({m.id for m in before} & {m.id for m in after})
        self.assertEqual(
            sorted((suffixes([m])[0], m.body.get("new")) for m in after),
            sorted([("buildsys.build.state.change", COMPLETE),
                    ("buildsys.task.state.change", "CLOSED"),  # the build's
                    ("buildsys.task.state.change", "CLOSED"),  # the repo's
                    ("buildsys.task.state.change", "FREE"),
                    ("buildsys.repo.done", None), ("buildsys.untag", None)]))
        self.assertIn(task, [m.body.get("id") for m in after])

    def test_cursor_without_tasks_choice(self) -> None:
        """
        A cursor of a version that did not record the tasks choice is taken
        to have had the current one: it goes on where it was, publishing
        what happened since once and nothing of before again, with no poll
        of its own and no floor.
        """
        source = self.source(**{**ALL_OFF, "tasks": "parents"})
        cursor = self.start(source)
        _, task = self.koji.start_build("before", "1", "1")
        before, cursor = self.drain(source, cursor)
        self.assertEqual([(m.body["id"], m.body["new"]) for m in before], [(task, "OPEN")])
        # The cursor file as the earlier version wrote it.
        del cursor["tasks"]["choice"]
        cursor = json.loads(json.dumps(cursor))
        self.koji.set_task_state(task, CLOSED)
        scratch = self.koji.scratch_build("since.src.rpm")
        self.koji.event()
        first = self.poll(source, cursor)
        self.assertEqual(sorted((m.body["id"], m.body["new"]) for m in first.messages),
                         [(task, "CLOSED"), (scratch, "FREE")])
        self.assertFalse({m.id for m in before} & {m.id for m in first.messages})
        self.assertEqual(first.cursor["tasks"]["choice"], "parents")
        self.assertNotIn("widened", first.cursor["tasks"])


class ForeignCursorTests(SourceTestBase):
    """
    A saved cursor that is not a Koji poller's.
    """

    def test_foreign_cursor_refused(self) -> None:
        """
        A cursor of another poller (a Bugzilla's, a generic one's), or one
        edited into another shape, is refused as not the poller's own
        before the hub is asked anything: it says nothing of where the
        poller got to.
        """
        source = self.source()
        good = self.start(source)
        calls = len(self.koji.server.calls)
        for cursor, reason in [
            ({"since": 1740000000.0, "seen": {}, "offset": 0},
             "is not a Koji poller's cursor: its 'event' is None"),
            ({"value": "2025-03-01T12:01:00", "time": True, "seen": []},
             "is not a Koji poller's cursor: its 'event' is None"),
            ({**good, "event": str(good["event"])},
             f"is not a Koji poller's cursor: its 'event' is '{good['event']}'"),
            ({k: v for k, v in good.items() if k != "repos"},
             "is not a Koji poller's cursor: its 'repos' is None"),
            (497700, "holds int, not a Koji poller's cursor"),
        ]:
            failure = self.failureResultOf(source.poll(cursor), ForeignCursor)
            self.assertEqual(failure.value.reason, reason)
        self.assertEqual(len(self.koji.server.calls), calls)
        self.poll(source, good)
