"""
Tests for the failed-area requests that C{fedhub outbox} leaves in the spool
for the running hub (L{fedhub.outbox.spool.write_request} and
L{fedhub.outbox.spool.SpoolImporter}), above all when the hub dies while it
carries one out: the request is carried out again at the next start, and
must then act on the messages the first run acted on, and no others.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from fedhub.errors import MessageReturned, TemporarilyUnavailable
from fedhub.message import Message
from fedhub.outbox import Outbox, spool
from fedhub.outbox.spool import CONTROL_SUFFIX, REPLIES, SpoolImporter, write_request
from fedhub.outbox.store import FailedRecord
from tests.test_outbox import FakeBus, OutboxTestCase, make_message
from tests.test_spool_crash import Died, Process, synchronous


class DyingArea:
    """
    An outbox whose process dies as it is asked to retry or drop failed
    messages, before its store does anything.
    """

    def __init__(self, outbox: Outbox, process: Process) -> None:
        self.outbox = outbox
        self.process = process
        self.asked: list[tuple[str, list[int] | None]] = []

    def failed(self, after_seq: int = 0, limit: int = 100) -> Deferred[list[FailedRecord]]:
        return self.outbox.failed(after_seq, limit)

    def retry_failed(self, seqs: list[int] | None = None) -> Deferred[Any]:
        self.asked.append(("retry", None if seqs is None else list(seqs)))
        return self.process.die()

    def drop_failed(self, seqs: list[int] | None = None) -> Deferred[Any]:
        self.asked.append(("drop", None if seqs is None else list(seqs)))
        return self.process.die()


class RequestTestCase(OutboxTestCase):
    """
    An outbox with a failed area, and the spool of its domain.
    """

    def setUp(self) -> None:
        super().setUp()
        self.spool = os.path.abspath(os.path.join(self.mktemp(), "spool", "test"))

    def make_failed(self, outbox: Outbox, bus: FakeBus, messages: list[Message]) -> None:
        """
        Hand C{messages} to the outbox and have the broker return each.
        """
        self.publish_all(outbox, messages)
        while bus.outstanding:
            message, _ = bus.outstanding[0]
            if message in messages:
                bus.fail_next(MessageReturned("NO_ROUTE", message.id, 312))
            else:
                bus.ack()

    def failed(self, outbox: Outbox) -> list[FailedRecord]:
        return self.successResultOf(outbox.failed(0, 1000))

    def failed_ids(self, outbox: Outbox) -> list[str]:
        return [record.message_id for record in self.failed(outbox)]

    def restart(self, outbox: Outbox) -> tuple[Outbox, FakeBus]:
        """
        What a new hub finds of the outbox: every commit so far.
        """
        self.stop(outbox, None)
        return self.make()

    def importer(self, area: Any) -> SpoolImporter:
        return synchronous(SpoolImporter("test", self.spool, area, self.clock, failed_area=area))

    def dying(self, area: Any, process: Process, when: Callable[[Any, tuple[Any, ...]], bool]) -> SpoolImporter:
        """
        An importer whose process dies instead of doing the file work for
        which C{when(fn, args)} is true.
        """
        importer = process.run(SpoolImporter("test", self.spool, area, self.clock, failed_area=area))
        run = importer._in_thread

        def in_thread(fn: Any, *args: Any) -> Deferred[Any]:
            if when(fn, args):
                return process.die()
            return run(fn, *args)

        importer._in_thread = in_thread  # type: ignore[method-assign]
        return importer

    def requests(self) -> list[str]:
        if not os.path.isdir(self.spool):
            return []
        return sorted(name for name in os.listdir(self.spool) if name.endswith(CONTROL_SUFFIX))

    def answer(self, reply: str) -> dict[str, Any]:
        with open(reply, "rb") as f:
            answer: dict[str, Any] = json.loads(f.read())
        return answer

    def end(self, process: Process, d: Deferred[None]) -> None:
        """
        End the scan C{process} died in: nothing it did after its death
        happened.
        """
        self.assertTrue(process.dead)
        self.assertNoResult(d)
        process.bury()
        d.addErrback(lambda f: f.trap(Died))
        self.successResultOf(d)

    def rerun_after_a_failure(self, outbox: Outbox) -> tuple[Outbox, Message]:
        """
        Start a new hub on what is left of C{outbox}, have one more message
        fail, then carry out the requests in the spool.

        @return: The new hub's outbox and the message that failed.
        """
        outbox, bus = self.restart(outbox)
        later = make_message(10)
        self.make_failed(outbox, bus, [later])
        self.successResultOf(self.importer(outbox)._import())
        return outbox, later

    def crash_before_answer(self, area: Any) -> None:
        """
        Carry out the requests in the spool; die right before the first
        answer is written and its request deleted.
        """
        process = Process()
        importer = self.dying(area, process, lambda fn, args: fn is spool._answer)
        d = importer._import()
        self.end(process, d)


class RepeatedRequestTests(RequestTestCase):
    """
    A hub that dies after carrying out a request and before deleting it.
    """

    def test_drop_all_again_drops_only_what_it_dropped(self) -> None:
        """A drop of every failed message, carried out again after a crash, leaves the messages that failed since alone, and answers as the first run would have."""
        outbox, bus = self.make(window=10)
        first = [make_message(n) for n in range(3)]
        self.make_failed(outbox, bus, first)
        reply = write_request(self.spool, "drop", None)
        self.crash_before_answer(outbox)
        self.assertEqual(self.failed_ids(outbox), [])
        self.assertEqual(len(self.requests()), 1)

        outbox, later = self.rerun_after_a_failure(outbox)
        self.assertEqual(self.failed_ids(outbox), [later.id])
        self.assertEqual(self.answer(reply), {"action": "drop", "count": 3})
        self.assertEqual(self.requests(), [])

    def test_retry_all_again_retries_only_what_it_retried(self) -> None:
        """A retry of every failed message, carried out again after a crash, leaves the messages that failed since in the failed area."""
        outbox, bus = self.make(window=10)
        first = [make_message(n) for n in range(2)]
        self.make_failed(outbox, bus, first)
        reply = write_request(self.spool, "retry", None)
        self.crash_before_answer(outbox)
        self.assertEqual(self.failed_ids(outbox), [])

        outbox, bus = self.restart(outbox)
        # The new hub publishes what the first run moved back to pending.
        self.assertEqual([m.id for m in bus.published], [m.id for m in first])
        bus.ack_all()
        later = make_message(10)
        self.make_failed(outbox, bus, [later])
        self.successResultOf(self.importer(outbox)._import())
        self.assertEqual(self.failed_ids(outbox), [later.id])
        self.assertEqual(outbox.store.pending_count, 0)
        self.assertEqual([m.id for m in bus.published], [m.id for m in first] + [later.id])
        self.assertEqual(self.answer(reply), {"action": "retry", "count": 2})
        self.assertEqual(self.requests(), [])

    def test_message_failed_again_not_retried_again(self) -> None:
        """A message that was retried by the first run and failed again is not retried a second time by the repeat."""
        outbox, bus = self.make(window=10)
        message = make_message(1)
        self.make_failed(outbox, bus, [message])
        reply = write_request(self.spool, "retry", None)
        self.crash_before_answer(outbox)

        outbox, bus = self.restart(outbox)
        bus.fail_next(MessageReturned("NO_ROUTE", message.id, 312))
        [record] = self.failed(outbox)
        self.assertEqual((record.message_id, record.attempts), (message.id, 2))
        self.successResultOf(self.importer(outbox)._import())
        self.assertEqual(self.failed(outbox), [record])
        self.assertEqual(bus.published, [message])
        self.assertEqual(self.answer(reply), {"action": "retry", "count": 1})

    def test_explicit_seqs_answer_again(self) -> None:
        """A request naming messages, carried out again after a crash, answers with how many of them the first run acted on, not with zero."""
        outbox, bus = self.make(window=10)
        messages = [make_message(n) for n in range(3)]
        self.make_failed(outbox, bus, messages)
        seqs = [record.seq for record in self.failed(outbox)]
        reply = write_request(self.spool, "drop", [seqs[0], seqs[2], 999_999])
        self.crash_before_answer(outbox)
        self.assertEqual(self.failed_ids(outbox), [messages[1].id])

        outbox, bus = self.restart(outbox)
        self.successResultOf(self.importer(outbox)._import())
        self.assertEqual(self.failed_ids(outbox), [messages[1].id])
        self.assertEqual(self.answer(reply), {"action": "drop", "count": 2})

    def test_answer_written_request_not_deleted(self) -> None:
        """A hub that dies after writing the answer but before deleting the request writes the same answer again and acts on nothing new."""
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(1), make_message(2)])
        reply = write_request(self.spool, "drop", None)
        process = Process()
        importer = process.run(SpoolImporter("test", self.spool, outbox, self.clock, failed_area=outbox))
        run = importer._in_thread

        def in_thread(fn: Any, *args: Any) -> Deferred[Any]:
            if fn is not spool._answer:
                return run(fn, *args)
            request = Path(args[1]).read_bytes()
            run(fn, *args)
            # Its deletion never happened.
            Path(args[1]).write_bytes(request)
            return process.die()

        importer._in_thread = in_thread  # type: ignore[method-assign]
        d = importer._import()
        self.end(process, d)
        self.assertEqual(self.answer(reply), {"action": "drop", "count": 2})
        os.unlink(reply)

        outbox, later = self.rerun_after_a_failure(outbox)
        self.assertEqual(self.failed_ids(outbox), [later.id])
        self.assertEqual(self.answer(reply), {"action": "drop", "count": 2})
        self.assertEqual(self.requests(), [])

    def test_died_before_acting(self) -> None:
        """A hub that dies after fixing the request's messages but before acting on them acts on exactly those at the next start."""
        outbox, bus = self.make(window=10)
        first = [make_message(n) for n in range(2)]
        self.make_failed(outbox, bus, first)
        seqs = [record.seq for record in self.failed(outbox)]
        reply = write_request(self.spool, "drop", None)
        process = Process()
        area = DyingArea(outbox, process)
        d = process.run(SpoolImporter("test", self.spool, outbox, self.clock, failed_area=area))._import()
        self.assertEqual(area.asked, [("drop", seqs)])
        self.end(process, d)
        self.assertEqual(self.failed_ids(outbox), [m.id for m in first])

        outbox, later = self.rerun_after_a_failure(outbox)
        self.assertEqual(self.failed_ids(outbox), [later.id])
        self.assertEqual(self.answer(reply), {"action": "drop", "count": 2})

    def test_died_before_fixing(self) -> None:
        """A hub that dies before it fixed the request's messages has acted on none: the next start acts on every failed message it then finds."""
        outbox, bus = self.make(window=10)
        first = [make_message(n) for n in range(2)]
        self.make_failed(outbox, bus, first)
        reply = write_request(self.spool, "drop", None)
        process = Process()
        importer = self.dying(outbox, process, lambda fn, args: fn is spool._rewrite_request)
        d = importer._import()
        self.end(process, d)
        self.assertEqual(self.failed_ids(outbox), [m.id for m in first])

        outbox, _ = self.rerun_after_a_failure(outbox)
        self.assertEqual(self.failed_ids(outbox), [])
        self.assertEqual(self.answer(reply), {"action": "drop", "count": 3})


class FixedRequestTests(RequestTestCase):
    """
    How a request is fixed to explicit messages before it is carried out.
    """

    def test_fixed_durably_before_acting(self) -> None:
        """The request file names the messages found, and the spool directory is fsync'd, before the outbox acts on them."""
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(1), make_message(2)])
        seqs = [record.seq for record in self.failed(outbox)]
        write_request(self.spool, "drop", None)
        [name] = self.requests()
        seen: list[Any] = []
        real_fsync = spool.fsync_directory

        def fsync(path: str) -> None:
            seen.append(("fsync", path))
            real_fsync(path)

        self.patch(spool, "fsync_directory", fsync)
        process = Process()
        area = DyingArea(outbox, process)
        importer = process.run(SpoolImporter("test", self.spool, outbox, self.clock, failed_area=area))
        run = importer._in_thread

        def in_thread(fn: Any, *args: Any) -> Deferred[Any]:
            if fn is spool._answer:
                seen.append("answer")
            return run(fn, *args)

        importer._in_thread = in_thread  # type: ignore[method-assign]
        real_drop = area.drop_failed

        def drop(seqs: list[int] | None = None) -> Deferred[Any]:
            seen.append("drop")
            with open(os.path.join(self.spool, name), "rb") as f:
                seen.append(json.loads(f.read()))
            return real_drop(seqs)

        area.drop_failed = drop  # type: ignore[method-assign]
        d = importer._import()
        self.assertEqual(seen[0], ("fsync", self.spool))
        self.assertEqual(seen[1], "drop")
        self.assertEqual(seen[2]["seqs"], None)
        self.assertEqual(seen[2]["found"], seqs)
        self.assertEqual(len(seen), 3)
        self.assertFalse(any(name.endswith(".tmp") for name in os.listdir(self.spool)))
        self.end(process, d)

    def test_nothing_failed(self) -> None:
        """A drop of every failed message when there is none answers 0 and acts on nothing."""
        outbox, _ = self.make(window=10)
        reply = write_request(self.spool, "drop", None)
        self.successResultOf(self.importer(outbox)._import())
        self.assertEqual(self.answer(reply), {"action": "drop", "count": 0})
        self.assertEqual(self.requests(), [])

    def test_named_and_gone(self) -> None:
        """A request naming only messages no longer failed answers 0."""
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(1)])
        reply = write_request(self.spool, "retry", [999_999])
        self.successResultOf(self.importer(outbox)._import())
        self.assertEqual(self.answer(reply), {"action": "retry", "count": 0})
        self.assertEqual(len(self.failed(outbox)), 1)

    def test_bad_found(self) -> None:
        """A request whose fixed messages are not a list of sequence numbers is answered with an error and acts on nothing."""
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(1)])
        seq = self.failed(outbox)[0].seq
        for found in (None, "all", [str(seq)], [True], {"seq": seq}):
            reply = write_request(self.spool, "drop", None)
            [name] = self.requests()
            with open(os.path.join(self.spool, name), "w") as f:
                json.dump({"action": "drop", "seqs": None, "reply": Path(reply).stem, "found": found}, f)
            self.successResultOf(self.importer(outbox)._import())
            self.assertIn("found", self.answer(reply)["error"], found)
            self.assertEqual(len(self.failed(outbox)), 1)
            self.assertEqual(self.requests(), [])

    def test_failed_area_unavailable(self) -> None:
        """
        While the failed area can not be used for now (the hub is starting
        and its outbox not open yet) a request is neither answered nor
        acted on, and stays: a later pass carries it out, as the command
        that queued it promised.
        """
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(1)])
        reply = write_request(self.spool, "drop", None)

        class Opening:
            """The outbox, its failed area unavailable until opened."""

            opened = False

            def __getattr__(self, name: str) -> Any:
                return getattr(outbox, name)

            def failed(self, after_seq: int = 0, limit: int = 100) -> Deferred[list[FailedRecord]]:
                if not self.opened:
                    return fail(TemporarilyUnavailable("the outbox of domain test is not open"))
                return outbox.failed(after_seq, limit)

        area = Opening()
        importer = self.importer(area)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.successResultOf(importer._import())
        self.successResultOf(importer._import())
        waits = [e for e in events if "waits until the outbox" in e.get("log_format", "")]
        # Said once (later passes say it at debug level, below the default).
        self.assertEqual([e["log_level"] for e in waits], [LogLevel.warn])
        self.assertFalse(os.path.exists(reply))
        self.assertEqual(len(self.requests()), 1)
        self.assertEqual(len(self.failed(outbox)), 1)
        area.opened = True
        self.successResultOf(importer._import())
        self.assertEqual(self.answer(reply)["action"], "drop")
        self.assertEqual(self.failed(outbox), [])
        self.assertEqual(self.requests(), [])

    def test_too_many_to_fix(self) -> None:
        """A request whose fixed form would be too large to read back is refused before anything is acted on."""
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(n) for n in range(20)])
        self.patch(spool, "REQUEST_BYTES", 120)
        reply = write_request(self.spool, "drop", None)
        self.successResultOf(self.importer(outbox)._import())
        self.assertIn("too many", self.answer(reply)["error"])
        self.assertEqual(len(self.failed(outbox)), 20)
        self.assertEqual(self.requests(), [])

    def test_oversized_request(self) -> None:
        """A request file larger than any request is deleted unanswered and acts on nothing; the requests after it are carried out."""
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(1), make_message(2)])
        self.patch(spool, "REQUEST_BYTES", 200)
        os.makedirs(self.spool)
        with open(os.path.join(self.spool, "0" + CONTROL_SUFFIX), "w") as f:
            json.dump({"action": "drop", "seqs": None, "reply": "x" * 300}, f)
        reply = write_request(self.spool, "list", None)
        self.successResultOf(self.importer(outbox)._import())
        self.assertEqual(len(self.failed(outbox)), 2)
        self.assertEqual(len(self.answer(reply)["records"]), 2)
        os.unlink(reply)
        self.assertEqual(os.listdir(os.path.join(self.spool, REPLIES)), [])
        self.assertEqual(self.requests(), [])

    def test_list_not_rewritten(self) -> None:
        """A list request is answered without being rewritten first."""
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(1)])
        reply = write_request(self.spool, "list", None)
        importer = self.dying(outbox, Process(), lambda fn, args: fn is spool._rewrite_request)
        self.successResultOf(importer._import())
        self.assertEqual([r["message_id"] for r in self.answer(reply)["records"]], [make_message(1).id])

    def test_fixing_fails(self) -> None:
        """When the request can not be rewritten (disk full) it is answered with the error, acts on nothing, and leaves no temporary file."""
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(1)])
        reply = write_request(self.spool, "drop", None)
        importer = self.importer(outbox)
        run = importer._in_thread

        def no_space(fd: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def in_thread(fn: Any, *args: Any) -> Deferred[Any]:
            if fn is not spool._rewrite_request:
                return run(fn, *args)
            real = os.fsync
            os.fsync = no_space
            try:
                return run(fn, *args)
            finally:
                os.fsync = real

        importer._in_thread = in_thread  # type: ignore[method-assign]
        self.successResultOf(importer._import())
        self.assertIn("No space left", self.answer(reply)["error"])
        self.assertEqual(len(self.failed(outbox)), 1)
        self.assertEqual(self.requests(), [])
        self.assertEqual([name for name in os.listdir(self.spool) if name != REPLIES], [])


class ListPageTests(RequestTestCase):
    """
    A list is answered a page at a time: the hub never holds (nor writes)
    more of a large failed area than one page.
    """

    def list_page(self, outbox: Outbox, after: int | None = None) -> dict[str, Any]:
        """
        The hub's answer to a list request for the page after C{after}.
        """
        if after is None:
            reply = write_request(self.spool, "list", None)
        else:
            reply = write_request(self.spool, "list", None, after)
        self.successResultOf(self.importer(outbox)._import())
        self.assertEqual(self.requests(), [])
        answer = self.answer(reply)
        os.unlink(reply)
        return answer

    def test_one_page_per_answer(self) -> None:
        """
        A failed area larger than a page is answered with one page and the
        sequence number to ask after for the next; the last page has none.
        Asked in turn, the pages give every record once, in order.
        """
        self.patch(spool, "LIST_RECORDS", 3)
        outbox, bus = self.make(window=10)
        messages = [make_message(n) for n in range(7)]
        self.make_failed(outbox, bus, messages)
        seqs = [record.seq for record in self.failed(outbox)]
        answer = self.list_page(outbox)
        self.assertEqual([r["seq"] for r in answer["records"]], seqs[:3])
        self.assertEqual(answer["next"], seqs[2])
        listed = list(answer["records"])
        while "next" in answer:
            answer = self.list_page(outbox, answer["next"])
            self.assertLessEqual(len(answer["records"]), 3)
            listed.extend(answer["records"])
        self.assertEqual(len(answer["records"]), 1)
        self.assertEqual([r["message_id"] for r in listed], [m.id for m in messages])
        self.assertEqual(len(self.failed(outbox)), 7)

    def test_page_bounded_in_bytes(self) -> None:
        """
        A page also ends before the record that would take its stored
        messages past LIST_BYTES, but holds one record however large.
        """
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(n) for n in range(3)])
        records = self.failed(outbox)
        self.patch(spool, "LIST_BYTES", len(records[0].data) + len(records[1].data))
        answer = self.list_page(outbox)
        self.assertEqual(([r["seq"] for r in answer["records"]], answer["next"]),
                         ([records[0].seq, records[1].seq], records[1].seq))
        self.patch(spool, "LIST_BYTES", 1)
        answer = self.list_page(outbox)
        self.assertEqual(([r["seq"] for r in answer["records"]], answer["next"]),
                         ([records[0].seq], records[0].seq))
        answer = self.list_page(outbox, records[1].seq)
        self.assertEqual([r["seq"] for r in answer["records"]], [records[2].seq])
        self.assertNotIn("next", answer)

    def test_after_not_an_integer(self) -> None:
        """A list request whose C{after} is no integer is answered with an error."""
        outbox, bus = self.make(window=10)
        self.make_failed(outbox, bus, [make_message(1)])
        for after in ("1", True, 1.5):
            os.makedirs(self.spool, exist_ok=True)
            with open(os.path.join(self.spool, "0" + CONTROL_SUFFIX), "w") as f:
                json.dump({"action": "list", "seqs": None, "after": after, "reply": "bad"}, f)
            self.successResultOf(self.importer(outbox)._import())
            answer = self.answer(os.path.join(self.spool, REPLIES, "bad.json"))
            self.assertEqual(answer, {"action": "list", "error": "after must be an integer"}, after)
        self.assertEqual(len(self.failed(outbox)), 1)


class StaleFilesTests(SynchronousTestCase):
    """
    Replies no command read and temporary files of writers that died do not
    pile up in the spool.
    """

    def test_answering_prunes_stale_files(self) -> None:
        """
        Answering a request removes replies and temporary files older than
        STALE_AFTER, and keeps the fresh ones.
        """
        directory = Path(self.mktemp()).absolute()
        replies = directory / REPLIES
        replies.mkdir(parents=True)
        old = time.time() - spool.STALE_AFTER - 60
        stale_reply, fresh_reply = replies / "gone.json", replies / "waiting.json"
        stale_tmp, fresh_tmp = directory / "1-2-3.ctl.tmp", directory / "4-5-6.msg.tmp"
        for path in (stale_reply, fresh_reply, stale_tmp, fresh_tmp):
            path.write_bytes(b"{}")
        for path in (stale_reply, stale_tmp):
            os.utime(path, (old, old))
        request = directory / ("7-8-9" + CONTROL_SUFFIX)
        request.write_bytes(b"{}")
        spool._answer(str(directory), str(request), "answer", {"action": "list", "count": 0})
        self.assertEqual(sorted(p.name for p in replies.iterdir()), ["answer.json", "waiting.json"])
        self.assertEqual(sorted(p.name for p in directory.iterdir() if p.is_file()), ["4-5-6.msg.tmp"])
