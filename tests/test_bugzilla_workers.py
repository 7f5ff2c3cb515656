"""
Tests for parsing bugmail in worker processes: L{BugEvent.from_json}, the
fingerprint a worker sends along (L{seed_fingerprint}), the worker's side
of the protocol (L{fedhub.producers.bugzilla.parse_worker}), the
L{ParserPool} with real child processes on the real reactor, the SMTP
listener in front of it, and the C{parse_workers}/C{parse_timeout} keys of
the C{bugzilla-smtp} plugin.

Tests that need a misbehaving worker run C{tests/parse_worker_fake.py}.
"""

# twisted.trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Generator
from dataclasses import replace
from pathlib import Path
from typing import Any

from automat import NoTransition
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fedhub.config import HubSettings, check_options
from fedhub.errors import ConfigError, TemporarilyUnavailable
from fedhub.plugins import PluginContext
from fedhub.producers.bugzilla import parse_worker
from fedhub.producers.bugzilla.parser import (
    MAX_MAIL_BYTES,
    Attachment,
    Blocker,
    BugEvent,
    BugmailError,
    Comment,
    MalformedBugmail,
    NotBugmail,
    parse_bugmail,
)
from fedhub.producers.bugzilla.producer import (
    Accepted,
    BugmailIntake,
    BugzillaSMTPPlugin,
    build_body,
    build_message,
    classify_failure,
    Quarantine,
    event_fingerprint,
    seed_fingerprint,
)
from fedhub.producers.bugzilla.smtp import BugmailListener, ListenerSettings
from fedhub.producers.bugzilla.workers import (
    ParserPool,
    ParseUnavailable,
    PooledBugmailListener,
    _Request,
    _Worker,
    _WorkerPool,
    worker_environment,
)
from tests.test_bugmail_fuzz import _mutate, mutation
from tests.test_poller import FakePublisher
from tests.test_smtp_raw import RawClient
from tests.test_smtp_server import dot_stuffed, envelope

reactor: Any = _reactor

DATA = Path(__file__).parent / "data" / "bugzilla"
SAMPLES = {p.name: p.read_bytes() for p in sorted(DATA.glob("*.eml"))}
CHANGED = SAMPLES["04_changed_status_resolution_with_comment.eml"]
NOT_BUGMAIL = SAMPLES["14_not_bugzilla_launchpad_bug_mail.eml"]
FAKE_WORKER = [sys.executable, str(Path(__file__).parent / "parse_worker_fake.py")]
RECIPIENT = "bugs@example.org"

#: The longest any single wait of these tests may take before the test
#: fails: a guard against hanging, not a measurement.
GUARD = 30.0


def events() -> dict[str, BugEvent]:
    """
    The sample mails that are bugmail, parsed in this process.
    """
    parsed = {}
    for name, raw in SAMPLES.items():
        try:
            parsed[name] = parse_bugmail(raw)
        except BugmailError:
            pass
    return parsed


def malformed_mail() -> bytes:
    """
    Bugzilla mail the parser refuses as malformed: two different
    X-Bugzilla-Product headers.
    """
    return CHANGED.replace(b"X-Bugzilla-Product:", b"X-Bugzilla-Product: Other\r\nX-Bugzilla-Product:", 1)


# --- BugEvent.from_json -----------------------------------------------------------


class FromJSONTests(SynchronousTestCase):
    """
    L{BugEvent.from_json} is the exact inverse of L{BugEvent.to_json} and
    refuses anything else.
    """

    def assertRoundTrip(self, event: BugEvent) -> None:
        data = event.to_json()
        again = BugEvent.from_json(json.loads(json.dumps(data)))
        self.assertEqual(again, event)
        self.assertEqual(dict(again.headers), dict(event.headers))
        self.assertEqual(list(again.headers), list(event.headers))
        self.assertEqual(again.to_json(), data)

    def test_samples(self) -> None:
        """Every sample bugmail's event survives to_json, JSON text and from_json unchanged."""
        parsed = events()
        self.assertGreaterEqual(len(parsed), 9)
        for event in parsed.values():
            self.assertRoundTrip(event)

    @settings(max_examples=150, deadline=None, database=None)
    @given(st.sampled_from(sorted(SAMPLES)), st.lists(mutation, min_size=1, max_size=8))
    def test_mutated_samples(self, name: str, ops: list[tuple[str, int, int, bytes]]) -> None:
        """Whatever event a mutated sample mail parses to survives the round trip."""
        try:
            event = parse_bugmail(_mutate(SAMPLES[name], ops))
        except BugmailError:
            return
        self.assertRoundTrip(event)

    def test_nested_values(self) -> None:
        """Blockers, several comments and attachments, and None-valued fields come back as they were."""
        base = events()["06_attachment_added_to_existing_bug.eml"]
        event = replace(
            base,
            event_type="dep_changed",
            blocker=Blocker(42, "the other bug"),
            comments=(Comment(None, "who", "text\nmore"), Comment(3, "a@b", "", "A B")),
            attachments=(Attachment(1, "one"), Attachment(2, "")),
            who_name=None,
            keywords=("a", "b"),
        )
        self.assertRoundTrip(event)

    def bad(self, change: Callable[[dict[str, Any]], object], *words: str) -> None:
        data = copy.deepcopy(events()["04_changed_status_resolution_with_comment.eml"].to_json())
        change(data)
        with self.assertRaises(ValueError) as caught:
            BugEvent.from_json(data)
        for word in words:
            self.assertIn(word, str(caught.exception))

    def test_refuses_malformed_input(self) -> None:
        """Wrong types, missing or unknown keys and inconsistent copies fail with a ValueError naming the key."""
        self.bad(lambda d: d.pop("summary"), "missing summary")
        self.bad(lambda d: d.update(extra=1), "unknown 'extra'")
        self.bad(lambda d: d.update(bug_id=True), "event.bug_id", "integer")
        self.bad(lambda d: d.update(bug_id="7"), "event.bug_id")
        self.bad(lambda d: d.update(summary=None), "event.summary", "string")
        self.bad(lambda d: d.update(status=3), "event.status")
        self.bad(lambda d: d.update(event_type="exploded"), "event.event_type")
        self.bad(lambda d: d.update(event_type=["new"]), "event.event_type")
        self.bad(lambda d: d.update(keywords="a,b"), "event.keywords")
        self.bad(lambda d: d.update(flags=[1]), "event.flags")
        self.bad(lambda d: d.update(changes={}), "event.changes", "list")
        self.bad(lambda d: d["changes"][0].update(name="bogus"), "event.changes[0].name")
        self.bad(lambda d: d["changes"][0].pop("added"), "event.changes[0]", "missing added")
        self.bad(lambda d: d["comments"][0].update(number=1.0), "event.comments[0].number")
        self.bad(lambda d: d["comment"].update(text="other"), "event.comment")
        self.bad(lambda d: d.update(comment=None), "event.comment")
        self.bad(lambda d: d.update(attachment={"id": 1, "description": ""}), "event.attachment")
        self.bad(lambda d: d.update(blocker=[1, "x"]), "event.blocker", "object")
        self.bad(lambda d: d.update(blocker={"bug_id": True, "summary": ""}), "event.blocker.bug_id")
        self.bad(lambda d: d.update(headers=[]), "event.headers")
        self.bad(lambda d: d["headers"].update({"X-Bugzilla-Foo": 1}), "event.headers")
        for value in (None, [], "{}", 3):
            with self.assertRaises(ValueError):
                BugEvent.from_json(value)

    def test_bool_in_comment_copy(self) -> None:
        """A comment whose number is true (equal to 1 in Python) is refused in the first-comment copy too."""
        event = BugEvent(7, "s", "p", "c", "w", "comment", "u", comments=(Comment(1, "a", "t"),))
        data = event.to_json()
        data["comment"]["number"] = True
        with self.assertRaises(ValueError):
            BugEvent.from_json(data)


# --- fingerprints made elsewhere ----------------------------------------------------


class SeedFingerprintTests(SynchronousTestCase):
    """
    L{seed_fingerprint} gives an event the body and fingerprint the hub
    would compute, without computing the fingerprint.
    """

    def test_seeded_equals_computed(self) -> None:
        """With and without the to_json data, the seeded body and fingerprint equal the computed ones."""
        for name, raw in SAMPLES.items():
            try:
                computed = parse_bugmail(raw)
            except BugmailError:
                continue
            fingerprint = event_fingerprint(computed)
            for data in (None, json.loads(json.dumps(computed.to_json()))):
                seeded = parse_bugmail(raw)
                seed_fingerprint(seeded, fingerprint, data)
                self.assertEqual(build_body(seeded), build_body(computed), name)
                self.assertEqual(event_fingerprint(seeded), fingerprint)
                topic = "org.example.{}".format
                self.assertEqual(build_message(seeded, topic).body, build_message(computed, topic).body)
                self.assertEqual(build_message(seeded, topic).id, build_message(computed, topic).id)

    def test_seeded_is_used(self) -> None:
        """event_fingerprint returns the seeded value: nothing computes it again."""
        event = parse_bugmail(CHANGED)
        seed_fingerprint(event, "0" * 64)
        self.assertEqual(event_fingerprint(event), "0" * 64)

    def test_worker_fingerprint(self) -> None:
        """The worker's fingerprint is event_fingerprint's, for every sample."""
        for name, event in events().items():
            response = parse_worker.handle(SAMPLES[name])
            self.assertEqual(response["fingerprint"], event_fingerprint(event), name)
            self.assertEqual(BugEvent.from_json(response["event"]), event)


# --- the worker's side ---------------------------------------------------------------


def frames(data: bytes) -> list[dict[str, Any]]:
    """
    The JSON payloads of the frames in C{data}.
    """
    out = []
    while data:
        (size,) = parse_worker.FRAME_HEADER.unpack(data[:4])
        out.append(json.loads(data[4:4 + size]))
        data = data[4 + size:]
    return out


def framed(*payloads: bytes) -> bytes:
    return b"".join(parse_worker.FRAME_HEADER.pack(len(p)) + p for p in payloads)


class WorkerSideTests(SynchronousTestCase):
    """
    L{parse_worker.serve} and L{parse_worker.handle}: the frames a worker
    reads and writes.
    """

    def serve(self, data: bytes, handler: Any = parse_worker.handle) -> tuple[int, list[dict[str, Any]]]:
        out = io.BytesIO()
        status = parse_worker.serve(io.BytesIO(data), out, handler)
        return status, frames(out.getvalue())

    def test_answers(self) -> None:
        """A ready frame first, then one answer per request: events, refusals with class, reason and code."""
        status, answers = self.serve(framed(CHANGED, NOT_BUGMAIL, malformed_mail()))
        self.assertEqual(status, 0)
        self.assertEqual(answers[0], {"ready": 1, "pid": os.getpid()})
        self.assertEqual(BugEvent.from_json(answers[1]["event"]), parse_bugmail(CHANGED))
        self.assertEqual(answers[2], {"error": {"class": "NotBugmail", "reason": (
            "Launchpad bug mail (X-Launchpad-* headers), not Bugzilla: no X-Bugzilla-* headers"),
            "code": "launchpad"}})
        self.assertEqual(answers[3]["error"]["class"], "MalformedBugmail")
        self.assertEqual(answers[3]["error"]["code"], "conflicting_headers")
        self.assertEqual(len(answers), 4)

    def test_unexpected_error(self) -> None:
        """An exception other than a BugmailError is reported with its type, and the worker goes on."""

        def handler(raw: bytes) -> dict[str, Any]:
            if raw == b"boom":
                raise KeyError("oops")
            return parse_worker.handle(raw)

        status, answers = self.serve(framed(b"boom", CHANGED), handler)
        self.assertEqual(status, 0)
        self.assertEqual(answers[1]["unexpected"]["type"], "KeyError")
        self.assertIn("oops", answers[1]["unexpected"]["detail"])
        self.assertIn("event", answers[2])

    def test_broken_frames(self) -> None:
        """A cut frame or one larger than a mail may be ends the worker with status 2."""
        self.assertEqual(self.serve(b"\x00\x00")[0], 2)
        self.assertEqual(self.serve(framed(CHANGED)[:-1])[0], 2)
        too_big = parse_worker.FRAME_HEADER.pack(parse_worker.MAX_REQUEST_BYTES + 1)
        self.assertEqual(self.serve(too_big + b"x" * 10)[0], 2)

    def test_answer_too_large(self) -> None:
        """An answer larger than MAX_RESPONSE_BYTES becomes a MalformedBugmail refusal."""
        self.patch(parse_worker, "MAX_RESPONSE_BYTES", 100)
        answer = json.loads(parse_worker.encode_response(parse_worker.handle(CHANGED)))
        self.assertEqual(answer["error"]["class"], "MalformedBugmail")
        self.assertEqual(answer["error"]["code"], "too_large")

    def test_surrogates(self) -> None:
        """Lone surrogates in an event survive the ASCII JSON of an answer."""
        payload = parse_worker.encode_response({"event": {"summary": "a\udcff"}, "fingerprint": "x"})
        self.assertEqual(json.loads(payload.decode("utf-8"))["event"]["summary"], "a\udcff")

    def test_environment(self) -> None:
        """The worker's PYTHONPATH starts with the directory this fedhub was imported from."""
        env = worker_environment({"PYTHONPATH": "/elsewhere", "HOME": "/h"})
        root = str(Path(parse_worker.__file__).resolve().parents[3])
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep), [root, "/elsewhere"])
        self.assertEqual(env["HOME"], "/h")


# --- a worker's machine, without processes ---------------------------------------------


class FakeProcessTransport:
    """
    The transport of a worker with no process: records what is written,
    signalled and closed.

    @ivar exited: Whether signals fail as they do once the process exited.
    """

    pid = 4242

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.signals: list[str] = []
        self.stdin_closed = 0
        self.exited = False

    def writeSequence(self, data: list[bytes]) -> None:
        self.written.append(b"".join(data))

    def signalProcess(self, signal: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(signal)

    def closeStdin(self) -> None:
        self.stdin_closed += 1


class FakeWorkerPool:
    """
    A pool for a lone L{_Worker}: records every call (with the worker's
    state at the time) and does nothing else, unless told to dispatch the
    mails in L{waiting} when a worker takes mail.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.waiting: list[_Request] = []

    def record(self, name: str, worker: _Worker, *args: Any) -> None:
        self.calls.append((name, worker.state, *args))

    def give_next(self, worker: _Worker) -> None:
        if self.waiting and worker.takes_mail:
            worker.dispatched(self.waiting.pop(0))

    def worker_ready(self, worker: _Worker) -> None:
        self.record("ready", worker)
        self.give_next(worker)

    def worker_answered(self, worker: _Worker, request: _Request, response: dict[str, Any]) -> None:
        self.record("answered", worker, request, response)
        self.give_next(worker)

    def worker_broken(self, worker: _Worker, what: str, request: _Request | None) -> None:
        self.record("broken", worker, what, request)

    def worker_took_too_long(self, worker: _Worker, request: _Request) -> None:
        self.record("took too long", worker, request)

    def worker_start_timeout(self, worker: _Worker) -> None:
        self.record("start timeout", worker)

    def worker_ended(self, worker: _Worker, reason: Failure, request: _Request | None,
                     told_to_exit: bool) -> None:
        self.record("ended", worker, reason.value, request, told_to_exit)

    def worker_stderr(self, worker: _Worker, line: str) -> None:
        self.record("stderr", worker, line)

    def worker_stderr_cut(self, worker: _Worker, limit: int) -> None:
        self.record("stderr cut", worker, limit)


READY = {"ready": 1, "pid": 4242}
ANSWER = {"error": {"class": "NotBugmail", "reason": "r", "code": "c"}}

#: Every state of the machine, by how a test gets there, and the name the
#: worker's state gives it.
STATES = {
    "starting": "starting",
    "idle": "idle",
    "busy": "busy",
    "closing starting": "closing",
    "closing idle": "closing",
    "closing busy": "closing",
    "ending busy": "ending",
    "ending": "ending",
    "ended": "ended",
}
BUSY = ("busy", "closing busy", "ending busy")
CLOSING = ("closing starting", "closing idle", "closing busy")
NOT_KILLED = ("starting", "idle", "busy", *CLOSING)


class WorkerMachineTests(SynchronousTestCase):
    """
    The machine of a L{_Worker}: every state against the inputs that matter
    there, with a fake pool, a fake transport and a fake clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = FakeWorkerPool()
        self.transport = FakeProcessTransport()
        self.worker = _Worker(self.pool, 3, self.clock, 30.0)
        self.worker.makeConnection(self.transport)
        self.worker.started()
        self.mail = _Request(b"the mail")

    def frame(self, response: Any) -> None:
        self.worker.childDataReceived(1, framed(json.dumps(response).encode()))

    def end(self, reason: BaseException | None = None) -> None:
        self.worker.processEnded(Failure(reason or ProcessDone(0)))

    def reach(self, state: str) -> None:
        """Drive the worker to C{state} (a key of L{STATES}), then forget the calls."""
        if state in ("idle", "busy", "closing idle", "closing busy", "ending busy"):
            self.frame(READY)
        if state in BUSY:
            self.worker.dispatched(self.mail)
        if state in CLOSING or state == "ending busy":
            self.worker.close_input()
        if state == "ending busy":
            self.worker.kill("stopping")
        if state == "ending":
            self.worker.kill("stopping")
        if state == "ended":
            self.end()
        self.assertEqual(self.worker.state, STATES[state])
        self.pool.calls.clear()
        self.transport.signals.clear()
        self.transport.stdin_closed = 0

    # -- starting --

    def test_started_then_ready(self) -> None:
        """started() gives it the timeout to say it is ready; a ready frame stops the timer and tells the pool."""
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 30.0)
        self.assertEqual((self.worker.state, self.worker.takes_mail), ("starting", False))
        self.frame(READY)
        self.assertEqual(self.pool.calls, [("ready", "idle")])
        self.assertEqual((self.worker.state, self.worker.takes_mail), ("idle", True))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTakesMail(True)

    def test_start_timeout(self) -> None:
        """Not ready within the timeout, while starting (input closed or not): reported, then killed."""
        for state in ("starting", "closing starting"):
            self.setUp()
            self.reach(state)
            self.clock.advance(29.9)
            self.assertEqual(self.pool.calls, [])
            self.clock.advance(0.1)
            self.assertEqual(self.pool.calls, [("start timeout", STATES[state])])
            self.assertEqual((self.worker.state, self.worker.killed), ("ending", "start timeout"))
            self.assertEqual(self.transport.signals, ["KILL"])

    def test_ready_after_close(self) -> None:
        """A ready frame after the input was closed stops the timer, but the pool hears nothing: it takes no mail."""
        self.reach("closing starting")
        self.frame(READY)
        self.assertEqual(self.pool.calls, [])
        self.assertEqual((self.worker.state, self.worker.takes_mail), ("closing", False))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTakesMail(False)
        self.frame(ANSWER)
        self.assertEqual(self.pool.calls, [("broken", "ending", "answered a mail it was not given", None)])

    def test_not_ready_first(self) -> None:
        """Any other frame first is a protocol error: killed, and its start timer stopped."""
        for state in ("starting", "closing starting"):
            self.setUp()
            self.reach(state)
            self.frame(ANSWER)
            self.assertEqual(self.pool.calls, [("broken", "ending", "did not start with a ready frame", None)])
            self.assertEqual((self.worker.killed, self.transport.signals), ("protocol", ["KILL"]))
            self.assertEqual(self.clock.getDelayedCalls(), [])

    # -- mail --

    def test_dispatched(self) -> None:
        """An idle worker given a mail writes it as one frame and is busy with it."""
        self.reach("idle")
        self.worker.dispatched(self.mail)
        self.assertEqual(self.transport.written, [framed(b"the mail")])
        self.assertEqual((self.worker.state, self.worker.request), ("busy", self.mail))
        self.assertFalse(self.worker.takes_mail)

    def assertTakesMail(self, takes: bool) -> None:
        """The worker takes another mail (and answers it), or can not be given one."""
        second = _Request(b"the second mail")
        if not takes:
            self.assertRaises(NoTransition, self.worker.dispatched, second)
            return
        self.worker.dispatched(second)
        self.assertEqual(self.transport.written[-1], framed(b"the second mail"))
        self.frame(ANSWER)
        self.assertEqual(self.pool.calls[-1], ("answered", "idle", second, ANSWER))

    def test_answered(self) -> None:
        """An answer of a busy worker reaches the pool once the worker is idle (or closing) again."""
        for state, after in (("busy", "idle"), ("closing busy", "closing")):
            for response in (ANSWER, READY):
                # A frame from a busy worker that looks like a ready frame is
                # its answer (the pool finds it of no known kind).
                self.setUp()
                self.reach(state)
                self.frame(response)
                self.assertEqual(self.pool.calls, [("answered", after, self.mail, response)])
                self.assertEqual((self.worker.state, self.worker.request, self.worker.answered),
                                 (after, None, 1))
                self.assertEqual(self.transport.signals, [])
                self.assertTakesMail(after == "idle")

    def test_unasked_answer(self) -> None:
        """Any frame from an idle worker (input closed or not) is a protocol error: killed."""
        for state in ("idle", "closing idle"):
            for response in (ANSWER, READY):
                self.setUp()
                self.reach(state)
                self.frame(response)
                self.assertEqual(self.pool.calls,
                                 [("broken", "ending", "answered a mail it was not given", None)])
                self.assertEqual((self.worker.killed, self.transport.signals), ("protocol", ["KILL"]))

    def test_bad_frames(self) -> None:
        """A frame that is not a JSON object, or one announced too large, kills a worker in any state; its mail goes to the pool to fail."""
        for state in NOT_KILLED:
            for data, what in (
                (framed(b"[1, 2]"), "sent a frame that is not a JSON object"),
                (framed(b"{"), "sent a frame that is not a JSON object"),
                (parse_worker.FRAME_HEADER.pack(parse_worker.MAX_RESPONSE_BYTES + 1),
                 f"announced a frame of {parse_worker.MAX_RESPONSE_BYTES + 1} bytes"),
            ):
                self.setUp()
                self.reach(state)
                self.worker.childDataReceived(1, data)
                mail = self.mail if state in BUSY else None
                self.assertEqual(self.pool.calls, [("broken", "ending", what, mail)], state)
                self.assertEqual((self.worker.request, self.worker.killed), (None, "protocol"))
                self.assertEqual(self.transport.signals, ["KILL"])

    def test_frames_in_one_read(self) -> None:
        """Frames that arrive together are taken in order: a ready frame, an answer, and the next frame is an error."""
        self.pool.waiting.append(self.mail)
        self.worker.childDataReceived(1, framed(json.dumps(READY).encode(), json.dumps(ANSWER).encode(),
                                                json.dumps(ANSWER).encode()))
        self.assertEqual([c[:2] for c in self.pool.calls],
                         [("ready", "idle"), ("answered", "idle"), ("broken", "ending")])

    def test_frames_ignored_once_killed(self) -> None:
        """Whatever a killed worker still writes is ignored."""
        for state in ("ending busy", "ending"):
            self.setUp()
            self.reach(state)
            self.frame(ANSWER)
            self.frame(READY)
            self.worker.childDataReceived(1, framed(b"nonsense"))
            self.assertEqual(self.pool.calls, [])
            self.assertEqual(self.worker.state, "ending")

    def test_took_too_long(self) -> None:
        """A busy worker (input closed, or killed, or not) whose mail takes too long is killed; the mail goes to the pool to fail."""
        for state, killed in (("busy", "timeout"), ("closing busy", "timeout"), ("ending busy", "stopping")):
            self.setUp()
            self.reach(state)
            self.worker.took_too_long()
            self.assertEqual(self.pool.calls, [("took too long", "ending", self.mail)])
            self.assertEqual((self.worker.request, self.worker.killed), (None, killed))
            self.assertEqual(self.transport.signals, ["KILL"])
            # At its end, the pool hears of no mail.
            self.end()
            self.assertEqual(self.pool.calls[-1][3], None)

    def test_next_mail_before_answer_goes_on(self) -> None:
        """A pool that dispatches from worker_ready and worker_answered: the worker writes the next mail before the pool's answer call returns."""
        second = _Request(b"the second mail")
        self.pool.waiting = [self.mail, second]
        self.frame(READY)
        self.assertEqual((self.worker.state, self.worker.request), ("busy", self.mail))
        self.frame(ANSWER)
        self.assertEqual((self.worker.state, self.worker.request), ("busy", second))
        self.assertEqual(self.transport.written, [framed(b"the mail"), framed(b"the second mail")])

    # -- closing and killing --

    def test_close_input(self) -> None:
        """Closing the input of a live worker closes its stdin once; a worker not killed is closing from then on."""
        for state in ("starting", "idle", "busy"):
            self.setUp()
            self.reach(state)
            self.worker.close_input()
            self.worker.close_input()
            self.assertEqual((self.worker.state, self.transport.stdin_closed), ("closing", 1))
            self.assertEqual(self.worker.request, self.mail if state == "busy" else None)
            self.assertEqual(self.pool.calls, [])

    def test_close_input_killed(self) -> None:
        """Closing the input of a killed worker closes its stdin and changes nothing else."""
        for state in ("ending busy", "ending"):
            self.setUp()
            self.reach(state)
            self.worker.close_input()
            self.assertEqual((self.worker.state, self.transport.stdin_closed), ("ending", 1))

    def test_kill(self) -> None:
        """kill() signals the process; a worker with a mail keeps it until its end, for the pool to fail."""
        for state in NOT_KILLED:
            self.setUp()
            self.reach(state)
            self.worker.kill("stopping")
            self.assertEqual((self.worker.state, self.worker.killed), ("ending", "stopping"))
            self.assertEqual(self.transport.signals, ["KILL"])
            self.assertEqual(self.clock.getDelayedCalls(), [])
            mail = self.mail if state in BUSY else None
            self.assertIs(self.worker.request, mail)
            self.end(ProcessTerminated(signal=9))
            [(name, _, _, request, _)] = self.pool.calls
            self.assertEqual((name, request), ("ended", mail))

    def test_kill_again(self) -> None:
        """Killing a killed worker signals it again and keeps the first reason; a process already gone is no error."""
        self.reach("ending")
        self.worker.kill("timeout")
        self.transport.exited = True
        self.worker.kill("again")
        self.assertEqual((self.worker.killed, self.transport.signals), ("stopping", ["KILL"]))
        self.assertEqual(self.pool.calls, [])

    # -- the end --

    def test_ended(self) -> None:
        """The end of the process reaches the pool with the mail it had, and whether it was told to exit."""
        for state in STATES:
            if state == "ended":
                continue
            self.setUp()
            self.reach(state)
            reason = ProcessDone(0)
            self.end(reason)
            mail = self.mail if state in BUSY else None
            self.assertEqual(self.pool.calls, [("ended", "ended", reason, mail, state in CLOSING)], state)
            self.assertEqual((self.worker.state, self.worker.request), ("ended", None))
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stderr_flushed_at_end(self) -> None:
        """A last line without a newline on standard error reaches the pool before the end does."""
        self.worker.childDataReceived(2, b"one\ntwo")
        self.end()
        self.assertEqual([c[0] for c in self.pool.calls], ["stderr", "stderr", "ended"])
        self.assertEqual([c[2] for c in self.pool.calls[:2]], ["one", "two"])

    # -- what can not happen --

    def test_impossible(self) -> None:
        """Inputs a state can not take raise NoTransition and change nothing."""
        impossible: list[tuple[str, Callable[[_Worker], object]]] = [
            ("starting", lambda w: w.dispatched(_Request(b"x"))),
            ("starting", lambda w: w.took_too_long()),
            ("idle", lambda w: w.took_too_long()),
            ("closing starting", lambda w: w.dispatched(_Request(b"x"))),
            ("idle", lambda w: w.started()),
            ("busy", lambda w: w.dispatched(_Request(b"x"))),
            ("closing idle", lambda w: w.dispatched(_Request(b"x"))),
            ("closing idle", lambda w: w.took_too_long()),
            ("ending", lambda w: w.dispatched(_Request(b"x"))),
            ("ending", lambda w: w.took_too_long()),
            ("ended", lambda w: w.kill("late")),
            ("ended", lambda w: w.close_input()),
            ("ended", lambda w: w.dispatched(_Request(b"x"))),
            ("ended", lambda w: w.processEnded(Failure(ProcessDone(0)))),
        ]
        for state, call in impossible:
            self.setUp()
            self.reach(state)
            self.assertRaises(NoTransition, call, self.worker)
            self.assertEqual(self.worker.state, STATES[state])
            self.assertEqual((self.pool.calls, self.transport.signals), ([], []))

    def test_fake_is_a_worker_pool(self) -> None:
        """The fake pool has what the _WorkerPool protocol asks for, and so has ParserPool."""
        fake: _WorkerPool = FakeWorkerPool()
        real: _WorkerPool = ParserPool(1)
        self.assertTrue(callable(fake.worker_ended) and callable(real.worker_ended))


# --- the pool, with real processes ------------------------------------------------------


def assert_temporary(test: Any, error: BaseException, kind: str) -> None:
    """
    C{error} is a L{ParseUnavailable} of C{kind} that the SMTP listener
    answers with 451: temporary, and not about storage (452).
    """
    test.assertIsInstance(error, ParseUnavailable)
    test.assertIsInstance(error, TemporarilyUnavailable)
    assert isinstance(error, ParseUnavailable)
    test.assertEqual(error.kind, kind)
    refusal = classify_failure(error)
    test.assertTrue(refusal.temporary)
    test.assertEqual(refusal.kind, "unavailable")


def alive(pid: int) -> bool:
    """
    Whether a process (zombies included) with this id exists.
    """
    return os.path.exists(f"/proc/{pid}")


def failure_of(d: Deferred[Any]) -> Deferred[BaseException]:
    """
    A Deferred firing with the exception C{d} fails with, or failing when
    C{d} succeeds.
    """

    def succeeded(result: object) -> BaseException:
        raise AssertionError(f"expected a failure, not {result!r}")

    def failed(failure: Failure) -> BaseException:
        assert failure.value is not None
        return failure.value

    out: Deferred[BaseException] = d.addCallbacks(succeeded, failed)
    return out


class PoolTestCase(TestCase):
    """
    Helpers for tests with a L{ParserPool} on the real reactor.
    """

    timeout = 120

    def pool(self, workers: int = 1, **kwargs: Any) -> ParserPool:
        pool = ParserPool(workers, reactor=reactor, **kwargs)
        self.addCleanup(self.stop, pool)
        return pool

    @inlineCallbacks
    def stop(self, pool: ParserPool) -> Generator[Deferred[Any], Any, None]:
        pids = pool.pids
        yield pool.stopService()
        for pid in pids:
            self.assertFalse(alive(pid), f"worker {pid} is left after stopService")

    @inlineCallbacks
    def until(self, predicate: Callable[[], bool], clock: Clock | None = None) -> Generator[Deferred[Any], Any, None]:
        """
        Wait until C{predicate()} holds (running C{clock}'s due calls as it
        goes); fail after L{GUARD} seconds.
        """
        waited = 0.0
        while not predicate():
            if clock is not None:
                clock.advance(0)
            if waited > GUARD:
                self.fail("timed out waiting")
            yield deferLater(reactor, 0.01, lambda: None)
            waited += 0.01

    @inlineCallbacks
    def started(self, pool: ParserPool, clock: Clock | None = None) -> Generator[Deferred[Any], Any, None]:
        pool.startService()
        yield self.until(lambda: pool.ready_workers == pool.workers, clock)

    @inlineCallbacks
    def send(self, listener: BugmailListener, raw: bytes, before: Callable[[], Any] | None = None
             ) -> Generator[Deferred[Any], Any, list[int]]:
        """
        Send one mail to C{listener} (calling C{before} once it is sent);
        every reply code of the session.
        """
        port = yield listener.when_listening()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client: RawClient = yield connectProtocol(endpoint, RawClient())
        client.send(envelope() + dot_stuffed(raw))
        if before is not None:
            yield before()
        yield client.replies(6)
        client.send(b"QUIT\r\n")
        yield client.until(lambda: client.lost)
        return client.codes()

    def busy_pid(self, pool: ParserPool) -> int:
        [worker] = [w for w in pool._slots if w is not None and w.state == "busy"]
        assert worker.pid is not None
        return worker.pid


class PoolTests(PoolTestCase):
    """
    L{ParserPool} parses in child processes exactly as the hub would, and
    turns every failure of a worker into a temporary one.
    """

    @inlineCallbacks
    def test_samples(self) -> Generator[Deferred[Any], Any, None]:
        """Every sample bugmail parses to the in-process event, headers and fingerprint included, with the fingerprint already known."""
        pool = self.pool(2)
        yield self.started(pool)
        self.assertEqual(len(pool.pids), 2)
        self.assertNotIn(os.getpid(), pool.pids)
        for name, expected in events().items():
            event = yield pool.parse(SAMPLES[name])
            self.assertIn("_fedhub_body", event.__dict__)
            self.assertEqual(event, expected)
            self.assertEqual(dict(event.headers), dict(expected.headers))
            self.assertEqual(event_fingerprint(event), event_fingerprint(parse_bugmail(SAMPLES[name])))
            self.assertEqual(build_body(event), build_body(expected))
        self.assertEqual(pool.counters["parsed"], len(events()))

    @inlineCallbacks
    def test_group_signals_ignored(self) -> Generator[Deferred[Any], Any, None]:
        """
        SIGINT and SIGTERM, which reach the workers when sent to the hub's
        process group, do not end them: the pool, which stops them itself,
        sees no crash and they go on parsing.
        """
        pool = self.pool(1)
        yield self.started(pool)
        [pid] = pool.pids
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        event = yield pool.parse(CHANGED)
        self.assertEqual(event, parse_bugmail(CHANGED))
        self.assertEqual(pool.pids, [pid])
        self.assertEqual(pool.counters["crashes"], 0)

    @inlineCallbacks
    def test_refusals(self) -> Generator[Deferred[Any], Any, None]:
        """NotBugmail and MalformedBugmail come back as the same class with the same reason and code."""
        pool = self.pool()
        yield self.started(pool)
        for raw, cls in ((NOT_BUGMAIL, NotBugmail), (malformed_mail(), MalformedBugmail)):
            with self.assertRaises(cls) as caught:
                parse_bugmail(raw)
            error = yield failure_of(pool.parse(raw))
            self.assertIs(type(error), cls)
            self.assertEqual(error.reason, caught.exception.reason)
            self.assertEqual(error.code, caught.exception.code)
        self.assertEqual(pool.counters["refused"], 2)

    @inlineCallbacks
    def test_intake_paths(self) -> Generator[Deferred[Any], Any, None]:
        """An intake parsing through the pool ends every mail as one parsing in process does: published, quarantined or refused alike."""
        pool = self.pool()
        yield self.started(pool)
        mails = [*SAMPLES.values(), malformed_mail(), b"", b"\xff" * 100]
        for quarantined in (False, True):
            outcomes = []
            for parse in (parse_bugmail, pool.parse):
                publisher = FakePublisher()
                quarantine = Quarantine(self.mktemp(), 100, 10**8, reactor) if quarantined else None
                intake = BugmailIntake(
                    lambda event, raw, publisher=publisher: publisher.publish(
                        build_message(event, "org.example.test.{}".format)),
                    clock=reactor, parse=parse, quarantine=quarantine,
                )
                results = []
                for raw in mails:
                    result = yield intake.receive(raw).addErrback(lambda f: f.value)
                    if isinstance(result, Accepted):
                        results.append((result.outcome, result.fingerprint, result.message_id))
                    else:
                        results.append((type(result), str(result), classify_failure(result)))
                outcomes.append((results, [m.body for m in publisher.messages]))
            self.assertEqual(outcomes[0], outcomes[1])
            kinds = [r[0] for r in outcomes[0][0]]
            if quarantined:
                self.assertEqual(kinds.count("quarantined"), 4)
            else:
                self.assertEqual(kinds.count(NotBugmail), 3)
                self.assertEqual(kinds.count(MalformedBugmail), 1)
            self.assertEqual(kinds.count("published"), len(events()))

    @inlineCallbacks
    def test_too_large(self) -> Generator[Deferred[Any], Any, None]:
        """A mail larger than the parser takes is refused as the parser refuses it, without a worker."""
        pool = self.pool()
        yield self.started(pool)
        error = yield failure_of(pool.parse(b"x" * (MAX_MAIL_BYTES + 1)))
        self.assertIs(type(error), MalformedBugmail)
        self.assertEqual(error.code, "too_large")
        self.assertEqual(pool.counters["parsed"] + pool.counters["refused"], 0)

    @inlineCallbacks
    def test_killed_mid_parse(self) -> Generator[Deferred[Any], Any, None]:
        """SIGKILL of a worker during a parse fails that mail temporarily; the next one is parsed by a new worker."""
        pool = self.pool(command=FAKE_WORKER)
        yield self.started(pool)
        d = pool.parse(b"SLEEP 600\n" + CHANGED)
        pid = self.busy_pid(pool)
        os.kill(pid, signal.SIGKILL)
        error = yield failure_of(d)
        assert_temporary(self, error, "crashed")
        event = yield pool.parse(CHANGED)
        self.assertEqual(event, parse_bugmail(CHANGED))
        self.assertNotIn(pid, pool.pids)
        self.assertFalse(alive(pid))
        self.assertEqual(pool.counters["crashes"], 1)

    @inlineCallbacks
    def test_timeout(self) -> Generator[Deferred[Any], Any, None]:
        """A parse that takes longer than the timeout fails temporarily, and its worker is killed and replaced."""
        clock = Clock()
        pool = self.pool(command=FAKE_WORKER, clock=clock, timeout=30.0)
        yield self.started(pool, clock)
        d = pool.parse(b"SLEEP 600\n" + CHANGED)
        pid = self.busy_pid(pool)
        clock.advance(29.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        assert_temporary(self, self.failureResultOf(d).value, "timeout")
        yield self.until(lambda: not alive(pid) and pool.ready_workers == 1, clock)
        self.assertNotIn(pid, pool.pids)
        event = yield pool.parse(CHANGED)
        self.assertEqual(event, parse_bugmail(CHANGED))

    @inlineCallbacks
    def test_queue(self) -> Generator[Deferred[Any], Any, None]:
        """Mails wait for a busy worker up to max_queue; one more fails at once; a waiting one fails after the timeout."""
        clock = Clock()
        pool = self.pool(command=FAKE_WORKER, clock=clock, timeout=30.0, max_queue=2)
        yield self.started(pool, clock)
        first = pool.parse(b"SLEEP 600\n" + CHANGED)
        waiting = [pool.parse(CHANGED), pool.parse(NOT_BUGMAIL)]
        self.assertEqual(pool.queued, 2)
        assert_temporary(self, self.failureResultOf(pool.parse(CHANGED)).value, "busy")
        self.assertEqual(pool.counters["busy"], 1)
        for d in waiting:
            self.assertNoResult(d)
        # A waiting mail fails after the timeout; the busy worker is killed
        # at the same moment, as it took just as long.
        clock.advance(30)
        assert_temporary(self, self.failureResultOf(first).value, "timeout")
        for d in waiting:
            assert_temporary(self, self.failureResultOf(d).value, "timeout")
        self.assertEqual(pool.queued, 0)

    @inlineCallbacks
    def test_queue_moves_on(self) -> Generator[Deferred[Any], Any, None]:
        """Waiting mails go to the worker as it becomes free, in order."""
        pool = self.pool(command=FAKE_WORKER)
        yield self.started(pool)
        results: list[Any] = []
        ds = [pool.parse(b"SLEEP 0.2\n" + CHANGED), pool.parse(NOT_BUGMAIL), pool.parse(CHANGED)]
        for i, d in enumerate(ds):
            d.addBoth(lambda r, i=i: results.append((i, r)))
        self.assertEqual(pool.queued, 2)
        yield self.until(lambda: len(results) == 3)
        self.assertEqual([i for i, _ in results], [0, 1, 2])
        self.assertIsInstance(results[1][1].value, NotBugmail)
        self.assertEqual(results[2][1], parse_bugmail(CHANGED))

    @inlineCallbacks
    def test_cancel_waiting(self) -> Generator[Deferred[Any], Any, None]:
        """Cancelling a waiting mail takes it out of the queue."""
        pool = self.pool(command=FAKE_WORKER)
        yield self.started(pool)
        first = pool.parse(b"SLEEP 0.2\n" + CHANGED)
        second = pool.parse(CHANGED)
        self.assertEqual(pool.queued, 1)
        second.cancel()
        self.failureResultOf(second)
        self.assertEqual(pool.queued, 0)
        event = yield first
        self.assertEqual(event.bug_id, parse_bugmail(CHANGED).bug_id)

    @inlineCallbacks
    def test_unexpected_error(self) -> Generator[Deferred[Any], Any, None]:
        """An unexpected error in a worker fails the mail temporarily, and the worker goes on."""
        pool = self.pool(command=FAKE_WORKER)
        yield self.started(pool)
        pid = pool.pids[0]
        error = yield failure_of(pool.parse(b"RAISE\n"))
        assert_temporary(self, error, "error")
        event = yield pool.parse(CHANGED)
        self.assertEqual(event, parse_bugmail(CHANGED))
        self.assertEqual(pool.pids, [pid])

    @inlineCallbacks
    def test_odd_answer(self) -> Generator[Deferred[Any], Any, None]:
        """An answer of no known kind fails the mail temporarily."""
        pool = self.pool(command=FAKE_WORKER)
        yield self.started(pool)
        error = yield failure_of(pool.parse(b"ODD\n"))
        assert_temporary(self, error, "protocol")

    @inlineCallbacks
    def test_huge_frame(self) -> Generator[Deferred[Any], Any, None]:
        """A worker announcing an answer beyond the limit is killed; its mail fails temporarily; a new worker takes over."""
        pool = self.pool(command=FAKE_WORKER)
        yield self.started(pool)
        pid = pool.pids[0]
        error = yield failure_of(pool.parse(b"HUGE\n"))
        assert_temporary(self, error, "protocol")
        yield self.until(lambda: not alive(pid) and pool.ready_workers == 1)
        event = yield pool.parse(CHANGED)
        self.assertEqual(event, parse_bugmail(CHANGED))

    @inlineCallbacks
    def test_dies_at_once(self) -> Generator[Deferred[Any], Any, None]:
        """A worker that exits on a mail fails it temporarily and is replaced."""
        pool = self.pool(command=FAKE_WORKER)
        yield self.started(pool)
        error = yield failure_of(pool.parse(b"EXIT\n"))
        assert_temporary(self, error, "crashed")
        event = yield pool.parse(CHANGED)
        self.assertEqual(event, parse_bugmail(CHANGED))

    @inlineCallbacks
    def test_stderr_logged(self) -> Generator[Deferred[Any], Any, None]:
        """What a worker writes on standard error is logged, line by line."""
        from twisted.logger import globalLogPublisher

        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("line") is not None and event.get("log_namespace", "").endswith("ParserPool"):
                lines.append(event["line"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        pool = self.pool(command=FAKE_WORKER)
        yield self.started(pool)
        event = yield pool.parse(b"NOISE\n" + CHANGED)
        self.assertEqual(event.bug_id, parse_bugmail(CHANGED).bug_id)
        yield self.until(lambda: len(lines) >= 2)
        self.assertEqual(lines[:2], ["first noisy line", "second noisy line"])

    @inlineCallbacks
    def test_cannot_start(self) -> Generator[Deferred[Any], Any, None]:
        """A worker that can not start is retried with a doubling delay, never in a loop; mails fail after the timeout."""
        clock = Clock()
        pool = self.pool(command=FAKE_WORKER + ["--exit", "3"], clock=clock, timeout=30.0,
                         restart_delay=1.0, max_restart_delay=4.0)
        pool.startService()
        d = pool.parse(CHANGED)
        self.assertEqual(pool.queued, 1)
        delays = []
        for _ in range(4):
            [pid] = pool.pids
            yield self.until(lambda: not pool.pids)
            self.assertFalse(alive(pid))
            # The next start waits for the clock: nothing is spawned meanwhile.
            [call] = pool._restarts.values()
            delays.append(call.getTime() - clock.seconds())
            yield deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(pool.pids, [])
            clock.advance(delays[-1])
        self.assertEqual(delays, [1.0, 2.0, 4.0, 4.0])
        self.assertNoResult(d)
        clock.advance(30 - sum(delays))
        assert_temporary(self, self.failureResultOf(d).value, "timeout")

    @inlineCallbacks
    def test_silent_start(self) -> Generator[Deferred[Any], Any, None]:
        """A worker that does not say it is ready within the timeout is killed and started again later."""
        clock = Clock()
        pool = self.pool(command=FAKE_WORKER + ["--silent"], clock=clock, timeout=30.0,
                         restart_delay=1.0)
        pool.startService()
        [pid] = pool.pids
        clock.advance(30)
        yield self.until(lambda: not alive(pid) and pool._restarts)
        self.assertEqual(pool.pids, [])
        self.assertEqual(pool.ready_workers, 0)

    @inlineCallbacks
    def test_stop(self) -> Generator[Deferred[Any], Any, None]:
        """stopService fails waiting mails, refuses new ones, and fires only once every worker has ended."""
        pool = self.pool(2, command=FAKE_WORKER)
        yield self.started(pool)
        pids = pool.pids
        busy = [pool.parse(b"SLEEP 0.3\n" + CHANGED), pool.parse(b"SLEEP 0.3\n" + CHANGED)]
        waiting = pool.parse(CHANGED)
        stopped = pool.stopService()
        assert_temporary(self, self.failureResultOf(waiting).value, "stopped")
        assert_temporary(self, self.failureResultOf(pool.parse(CHANGED)).value, "stopped")
        ended: list[bool] = []
        stopped.addCallback(lambda _: ended.extend(alive(pid) for pid in pids))
        yield stopped
        self.assertEqual(ended, [False, False])
        self.assertEqual(pool.pids, [])
        # The mails being parsed were answered: the workers finished them
        # before they read the end of their input.
        for d in busy:
            self.assertEqual(self.successResultOf(d), parse_bugmail(CHANGED))

    @inlineCallbacks
    def test_restart(self) -> Generator[Deferred[Any], Any, None]:
        """A stopped pool can be started again, with new workers."""
        pool = self.pool()
        yield self.started(pool)
        pids = pool.pids
        yield pool.stopService()
        yield self.started(pool)
        self.assertNotEqual(pool.pids, pids)
        event = yield pool.parse(CHANGED)
        self.assertEqual(event, parse_bugmail(CHANGED))

    @inlineCallbacks
    def test_stop_kills_stuck_workers(self) -> Generator[Deferred[Any], Any, None]:
        """A worker still busy stop_timeout seconds after stopService is killed; its mail fails temporarily."""
        pool = self.pool(command=FAKE_WORKER, stop_timeout=0.2, timeout=GUARD * 4)
        yield self.started(pool)
        [pid] = pool.pids
        d = pool.parse(b"SLEEP 600\n" + CHANGED)
        yield pool.stopService()
        self.assertFalse(alive(pid))
        assert_temporary(self, self.failureResultOf(d).value, "stopped")

    @inlineCallbacks
    def test_reactor_not_blocked(self) -> Generator[Deferred[Any], Any, None]:
        """The reactor runs other work while a worker parses: a call scheduled after the mail fires before its event arrives."""
        pool = self.pool(command=FAKE_WORKER)
        yield self.started(pool)
        order: list[str] = []
        d = pool.parse(b"SLEEP 0.2\n" + CHANGED)
        d.addCallback(lambda event: order.append("parsed"))
        reactor.callLater(0, order.append, "other work")
        yield d
        self.assertEqual(order, ["other work", "parsed"])

    @inlineCallbacks
    def test_parent_dies(self) -> Generator[Deferred[Any], Any, None]:
        """Workers of a hub killed with SIGKILL, one of them busy, do not outlive it."""
        script = (
            "import sys, os\n"
            "from twisted.internet import reactor\n"
            "from fedhub.producers.bugzilla.workers import ParserPool\n"
            f"pool = ParserPool(2, reactor=reactor, command={FAKE_WORKER!r})\n"
            "def ready():\n"
            "    if pool.ready_workers < 2:\n"
            "        reactor.callLater(0.01, ready); return\n"
            "    pool.parse(b'SLEEP 600\\n')\n"
            "    print(' '.join(map(str, pool.pids)), flush=True)\n"
            "reactor.callWhenRunning(pool.startService)\n"
            "reactor.callWhenRunning(ready)\n"
            "reactor.run()\n"
        )
        hub = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               env=worker_environment())
        self.addCleanup(lambda: hub.poll() is None and hub.kill())
        assert hub.stdout is not None
        line = yield deferToThread(hub.stdout.readline)
        pids = [int(p) for p in line.split()]
        self.assertEqual(len(pids), 2)
        self.assertTrue(all(alive(pid) for pid in pids))
        hub.kill()
        hub.wait()
        yield self.until(lambda: not any(alive(pid) for pid in pids))


# --- the listener in front of a pool -------------------------------------------------------


class ListenerTests(PoolTestCase):
    """
    The SMTP listener with a L{ParserPool}: parse failures take the same
    paths as in the hub process, and worker failures answer 451.
    """

    def listener(self, pool: ParserPool, publisher: FakePublisher) -> PooledBugmailListener:
        intake = BugmailIntake(
            lambda event, raw: publisher.publish(build_message(event, "org.example.test.{}".format)),
            clock=reactor, parse=pool.parse,
        )
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}))
        listener = PooledBugmailListener("tcp:0:interface=127.0.0.1", settings, intake, pool,
                                         reactor=reactor)
        return listener

    @inlineCallbacks
    def test_answers(self) -> Generator[Deferred[Any], Any, None]:
        """250 for bugmail (published once), 550 for mail that is not bugmail, 451 when the worker is killed mid-parse."""
        pool = ParserPool(1, reactor=reactor, command=FAKE_WORKER)
        publisher = FakePublisher()
        listener = self.listener(pool, publisher)
        listener.startService()
        self.assertTrue(pool.running)
        yield self.until(lambda: pool.ready_workers == 1)
        codes = yield self.send(listener, CHANGED)
        self.assertEqual(codes[-2], 250)
        [message] = publisher.messages
        self.assertEqual(message.body, build_body(parse_bugmail(CHANGED)))
        codes = yield self.send(listener, NOT_BUGMAIL)
        self.assertEqual(codes[-2], 550)

        @inlineCallbacks
        def kill() -> Generator[Deferred[Any], Any, None]:
            yield self.until(lambda: any(w is not None and w.state == "busy" for w in pool._slots))
            os.kill(self.busy_pid(pool), signal.SIGKILL)

        codes = yield self.send(listener, b"SLEEP 600\n" + CHANGED, kill)
        self.assertEqual(codes[-2], 451)
        self.assertEqual(len(publisher.messages), 1)
        pids = pool.pids
        yield listener.stopService()
        self.assertFalse(pool.running)
        self.assertFalse(any(alive(pid) for pid in pids))

    @inlineCallbacks
    def test_stop_order(self) -> Generator[Deferred[Any], Any, None]:
        """Stopping the listener lets a mail being parsed finish with 250 before the pool stops."""
        pool = ParserPool(1, reactor=reactor, command=FAKE_WORKER)
        publisher = FakePublisher()
        listener = self.listener(pool, publisher)
        listener.startService()
        yield self.until(lambda: pool.ready_workers == 1)
        port = yield listener.when_listening()
        client: RawClient = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), RawClient())
        client.send(envelope() + dot_stuffed(b"SLEEP 0.3\n" + CHANGED))
        yield self.until(lambda: any(w is not None and w.state == "busy" for w in pool._slots))
        pids = pool.pids
        yield listener.stopService()
        self.assertIn(250, client.codes())
        self.assertEqual(len(publisher.messages), 1)
        self.assertFalse(any(alive(pid) for pid in pids))


# --- the plugin ---------------------------------------------------------------------


class PluginTests(PoolTestCase):
    """
    The C{parse_workers} and C{parse_timeout} keys of C{bugzilla-smtp}.
    """

    def options(self, **extra: Any) -> Any:
        return check_options(BugzillaSMTPPlugin.options, {"recipients": [RECIPIENT], **extra})

    def context(self, **options: Any) -> PluginContext:
        values = dict(self.options(listen="tcp:0:interface=127.0.0.1"))
        values.update(options)
        return PluginContext(
            name="bugmail", domain="community", options=values, publisher=FakePublisher(),
            reactor=reactor,
            hub=HubSettings(topic_prefix="org.example", environment="test", state_dir=self.mktemp()),
        )

    def test_defaults(self) -> None:
        """One worker, a 30 s timeout and mails up to 64 KiB parsed in process by default."""
        options = self.options()
        self.assertEqual(options["parse_workers"], 1)
        self.assertEqual(options["parse_timeout"], 30.0)
        self.assertEqual(options["parse_inline_max"], 65536)
        self.assertEqual(options["parse_queue_max"], 100)
        self.assertEqual(options["parse_stop_timeout"], 5.0)

    def test_bad_values(self) -> None:
        """parse_workers outside 0..64 or not an integer, and a parse_timeout not above 0, are refused naming the key."""
        for value in (-1, 65, 1000, "2", True, 1.5):
            with self.assertRaises(ConfigError) as caught:
                self.options(parse_workers=value)
            self.assertIn("parse_workers", str(caught.exception))
        self.assertIn("between 0 and 64", str(self.assertRaises(ConfigError, self.options, parse_workers=65)))
        for value in (0, -1.0, "30"):
            with self.assertRaises(ConfigError) as caught:
                self.options(parse_timeout=value)
            self.assertIn("parse_timeout", str(caught.exception))
        for value in (0, 64):
            self.assertEqual(self.options(parse_workers=value)["parse_workers"], value)
        for value in (-1, "1", 1.5):
            with self.assertRaises(ConfigError) as caught:
                self.options(parse_inline_max=value)
            self.assertIn("parse_inline_max", str(caught.exception))
        self.assertEqual(self.options(parse_inline_max=0)["parse_inline_max"], 0)
        for key, value in (("parse_queue_max", -1), ("parse_queue_max", 1.5), ("parse_stop_timeout", 0),
                           ("parse_stop_timeout", "5")):
            with self.assertRaises(ConfigError) as caught:
                self.options(**{key: value})
            self.assertIn(key, str(caught.exception))
        self.assertEqual(self.options(parse_queue_max=0)["parse_queue_max"], 0)

    def test_build_refuses(self) -> None:
        """build() refuses a parse_workers value that bypassed the configuration check."""
        with self.assertRaises(ConfigError) as caught:
            BugzillaSMTPPlugin().build(self.context(parse_workers=65))
        self.assertIn("parse_workers", str(caught.exception))

    def test_build(self) -> None:
        """With workers the plugin builds a pooled listener that has started nothing; with 0 a plain one that parses in process."""
        service: Any = BugzillaSMTPPlugin().build(
            self.context(parse_workers=3, parse_timeout=7, parse_queue_max=12, parse_stop_timeout=2.5)
        )
        self.assertIsInstance(service, PooledBugmailListener)
        pool = service.pool
        self.assertEqual((pool.workers, pool.timeout, pool.max_queue, pool.stop_timeout), (3, 7.0, 12, 2.5))
        self.assertEqual(service.pool.pids, [])
        plain: Any = BugzillaSMTPPlugin().build(self.context(parse_workers=0))
        self.assertNotIsInstance(plain, PooledBugmailListener)
        self.assertIs(plain.intake._parse, parse_bugmail)

    @inlineCallbacks
    def test_built_service(self) -> Generator[Deferred[Any], Any, None]:
        """The built service starts its workers, answers 250 and 550 through them, and stops them."""
        context = self.context(parse_inline_max=0)
        service: Any = BugzillaSMTPPlugin().build(context)
        service.startService()
        pool = service.pool
        yield self.until(lambda: pool.ready_workers == 1)
        codes = yield self.send(service, CHANGED)
        self.assertEqual(codes[-2], 250)
        codes = yield self.send(service, NOT_BUGMAIL)
        self.assertEqual(codes[-2], 550)
        [message] = context.publisher.messages  # type: ignore[attr-defined]
        self.assertEqual(message.topic, "org.example.test.bugzilla.bug.update")
        self.assertEqual(pool.counters["parsed"], 1)
        pids = pool.pids
        yield service.stopService()
        self.assertFalse(any(alive(pid) for pid in pids))

    def test_build_routes_by_size(self) -> None:
        """The plugin's intake parses up to parse_inline_max bytes in process and hands larger mails to its pool."""
        asked: list[bytes] = []
        service: Any = BugzillaSMTPPlugin().build(self.context(parse_inline_max=len(CHANGED)))
        service.pool.parse = lambda raw: asked.append(raw) or Deferred()
        event = service.intake._parse(CHANGED)
        self.assertEqual(event, parse_bugmail(CHANGED))
        self.assertEqual(asked, [])
        larger = CHANGED + b"\n"
        pending = service.intake._parse(larger)
        self.assertIsInstance(pending, Deferred)
        self.assertEqual(asked, [larger])

    @inlineCallbacks
    def test_large_mail_through_the_pool(self) -> Generator[Deferred[Any], Any, None]:
        """Through the built service, a sample mail is parsed in process and the same event in a mail over the limit by a worker, both published once."""
        context = self.context(parse_inline_max=6000)
        service: Any = BugzillaSMTPPlugin().build(context)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        pool = service.pool
        yield self.until(lambda: pool.ready_workers == 1)
        self.assertLessEqual(len(CHANGED), 6000)
        codes = yield self.send(service, CHANGED)
        self.assertEqual(codes[-2], 250)
        self.assertEqual(pool.counters["parsed"], 0)
        # The same event once more, in a mail too large to parse in process:
        # the worker parses it, and it is a copy of the first.
        padded = CHANGED.replace(b"\nSubject:", b"\nX-Padding: " + b"p" * 2000 + b"\nSubject:", 1)
        self.assertGreater(len(padded), 6000)
        codes = yield self.send(service, padded)
        self.assertEqual(codes[-2], 250)
        self.assertEqual(pool.counters["parsed"], 1)
        self.assertEqual(len(context.publisher.messages), 1)  # type: ignore[attr-defined]
        pids = pool.pids
        yield service.stopService()
        self.assertFalse(any(alive(pid) for pid in pids))
