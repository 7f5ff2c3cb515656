"""
List, requeue or drop the messages a consumer dead-lettered.

Each consumer C{Q} (see L{fedhub.consumers.runner}) keeps what it will not
handle in its dead-letter queue C{Q.dead}.  These commands work on that queue
on the consumer's own domain, at the AMQP level, so that a message whose body
fedhub could not decode (and the broker dead-lettered) is listed and moved
byte for byte like any other:

  - C{fedhub dead-letters list CONSUMER [--limit N] [--json]}: how many
    messages the queue holds, and one row per message, oldest first: its
    id, topic, when it was dead-lettered (when the broker's C{x-death}
    header says) and why.  Nothing is removed: the messages are got without
    acknowledging them, and closing the channel puts them back in order;
  - C{fedhub dead-letters requeue CONSUMER ID ... | --all}: move messages
    back into C{Q}, through the exchange C{Q.return} with their own routing
    key (their topic), with publisher confirms and C{mandatory}.  A copy
    keeps the body bytes and every property of the original, its headers
    but for the reason fedhub gave (C{fedhub_dead_letter_reason}) and the
    broker's death records (C{x-death}, C{x-first-death-*},
    C{x-last-death-*}): the consumer handles it afresh, its retries counted
    from zero.  The original is acknowledged only once the broker confirmed
    its copy, so a message is never lost; a command killed in between leaves
    both, and the consumer gets the message twice;
  - C{fedhub dead-letters drop CONSUMER ID ... | --all}: delete messages.

Messages are named by message id; the others stay in the queue, in their
order.  Names that match nothing are reported, the others are acted on, and
the status is 1.  At most C{--limit} messages are held unacknowledged at once
(those passed over while looking for named ones, and those whose copies wait
for their confirms), so memory and the broker's unacknowledged count stay
bounded; C{--all} acts on the messages the queue held when the command
started, not on the ones dead-lettered meanwhile.  See C{docs/cli.md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from fedhub.amqp.codec import FieldValue
from fedhub.amqp.frames import encode_properties
from fedhub.amqp.protocol import map_error
from fedhub.cli import runner
from fedhub.cli.runner import (
    EX_CONFIG,
    EX_NOTFOUND,
    EX_OK,
    EX_UNAVAILABLE,
    CommandError,
    Runtime,
    positive_int,
)
from fedhub.config import ComponentConfig, Config, DomainConfig
from fedhub.consumers.runner import DEAD_LETTER_REASON_HEADER, consumer_queues
from fedhub.errors import NotFound
from fedhub.message import BASE_SCHEMA, INFO, FrozenDict, Message
from fedhub.text import escape_control

#: Messages C{list} shows unless C{--limit} says.
LIST_LIMIT = 100

#: Messages C{requeue} and C{drop} hold unacknowledged at once, at most,
#: unless C{--limit} says.
ACT_LIMIT = 10_000

#: The header in which the broker records each time it dead-lettered a
#: message (and RabbitMQ's summaries of the first and the last time).
DEATH_HEADER = "x-death"
DEATH_PREFIXES = ("x-first-death-", "x-last-death-")
#: The count of deliveries a quorum queue adds to a message it redelivers
#: (every C{list} or passed-over message counts one).
DELIVERY_COUNT_HEADER = "x-delivery-count"


@dataclass(frozen=True)
class ConsumerQueues:
    """
    Where a consumer's dead letters are, and where they go back to.

    @ivar consumer: The consumer's name.
    @ivar domain: Its domain.
    @ivar queue: Its queue C{Q}.
    @ivar dead: Its dead-letter queue C{Q.dead}.
    @ivar return_exchange: The fanout exchange C{Q.return} bound to C{Q}.
    @ivar quorum: Whether its queues are quorum queues (its
        C{queue_arguments}), whose messages can not be read without
        counting a delivery of each (see L{QUORUM_WARNING}).
    """

    consumer: str
    domain: DomainConfig
    queue: str
    dead: str
    return_exchange: str
    quorum: bool = False


def consumer_of(config: Config, name: str) -> ConsumerQueues:
    """
    The queues of the consumer called C{name}.

    @raise CommandError: with C{EX_CONFIG} when the configuration has no
        such consumer, or its domain is on the in-process bus.
    """
    component: ComponentConfig | None = next((c for c in config.consumers if c.name == name), None)
    if component is None:
        known = ", ".join(c.name for c in config.consumers) or "none"
        raise CommandError(
            f"the configuration has no consumer {escape_control(name)!r} (it has: {known})", EX_CONFIG
        )
    domain = runner.domain_of(config, component.domain)
    queue, dead, return_exchange = consumer_queues(component)
    quorum = component.queue_arguments.get("x-queue-type") == "quorum"
    return ConsumerQueues(component.name, domain, queue, dead, return_exchange, quorum)


#: What reading the messages of a quorum queue without taking them does:
#: each message put back counts one delivery, goes to the back of the
#: queue, and past a C{delivery-limit} (a policy's; RabbitMQ 4 sets 20 by
#: default) is dropped, since a dead-letter queue has no dead-letter
#: exchange of its own.
QUORUM_WARNING = (
    "{queue} is a quorum queue: every message read and put back counts one delivery "
    "(x-delivery-count) and goes to the back of the queue, and one put back more often than a "
    "delivery-limit allows is dropped; keep *.dead queues out of delivery-limit policies"
)


def warn_quorum(queues: ConsumerQueues) -> None:
    """
    Say on standard error what reading a quorum dead-letter queue costs,
    before a command reads messages it puts back.
    """
    if queues.quorum:
        print(f"fedhub dead-letters: warning: {QUORUM_WARNING.format(queue=queues.dead)}",
              file=sys.stderr)


# --- one dead-lettered message ------------------------------------------------


def _plain(value: Any) -> Any:
    """
    A header value as its plain Python value (the exact decoding keeps some
    as L{FieldValue}s).
    """
    return value.value if isinstance(value, FieldValue) else value


def _text(value: Any) -> str | None:
    value = _plain(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def is_death_header(name: str) -> bool:
    """
    Whether a header records the message's death: fedhub's reason, the
    broker's records, or a quorum queue's count of its deliveries, which a
    requeued copy goes without.
    """
    return name in (DEAD_LETTER_REASON_HEADER, DEATH_HEADER, DELIVERY_COUNT_HEADER) or name.startswith(
        DEATH_PREFIXES
    )


@dataclass(frozen=True)
class DeadMessage:
    """
    A message got from a dead-letter queue, as the broker sent it.

    @ivar position: Its place in the queue when it was got, from 1.
    @ivar delivery_tag: The broker's tag for it on the channel it came on.
    @ivar routing_key: Its routing key: the topic.
    @ivar properties: Its basic properties by Python name, decoded exactly
        (they encode back to the same bytes).
    @ivar body: Its body bytes.
    """

    position: int
    delivery_tag: int
    routing_key: str
    properties: dict[str, Any]
    body: bytes

    @property
    def id(self) -> str | None:
        """
        Its message id, if it has one.
        """
        return _text(self.properties.get("message_id")) or None

    @property
    def headers(self) -> dict[str, Any]:
        """
        Its headers table (empty when it has none).
        """
        headers = self.properties.get("headers")
        return headers if isinstance(headers, dict) else {}

    def _death(self, queue: str) -> dict[str, Any] | None:
        """
        The broker's record of dead-lettering it from C{queue}, else its
        latest record, if any.
        """
        deaths = _plain(self.headers.get(DEATH_HEADER))
        records = [d for d in deaths if isinstance(d, dict)] if isinstance(deaths, list) else []
        return next((d for d in records if _text(d.get("queue")) == queue), records[0] if records else None)

    def reason(self, queue: str) -> str:
        """
        Why it was dead-lettered from C{queue}: the reason fedhub gave, else
        what the broker recorded (C{rejected}, C{expired}, ...), else C{-}.
        """
        given = _text(self.headers.get(DEAD_LETTER_REASON_HEADER))
        if given is not None:
            return given
        death = self._death(queue)
        if death is not None:
            why = _text(death.get("reason")) or "?"
            return f"{why} in queue {_text(death.get('queue')) or '?'} (x-death)"
        first = _text(self.headers.get("x-first-death-reason"))
        return f"{first} (x-first-death-reason)" if first is not None else "-"

    def dead_lettered_at(self, queue: str) -> datetime | None:
        """
        When the broker dead-lettered it from C{queue}, when it says so (not
        for a copy fedhub dead-lettered itself).
        """
        death = self._death(queue)
        if death is None or _text(death.get("queue")) != queue:
            return None
        when = _plain(death.get("time"))
        return when if isinstance(when, datetime) else None

    def copy(self) -> Message:
        """
        What requeueing publishes: the same body bytes and properties,
        without the death headers (see L{is_death_header}).  Only its bytes
        and encoded properties are published: C{body} is a stand-in, as the
        bytes may not be a JSON object at all.

        @raise fedhub.errors.FedhubError: (or C{ValueError}) when the
            properties can not be encoded again.
        """
        properties = dict(self.properties)
        if "headers" in properties:
            properties["headers"] = {
                name: value for name, value in self.headers.items() if not is_death_header(name)
            }
        return Message._from_checked(
            topic=self.routing_key,
            body=FrozenDict(),
            headers=FrozenDict(),
            id=self.id or "",
            severity=INFO,
            priority=0,
            sent_at=None,
            schema=BASE_SCHEMA,
            queue=None,
            redelivered=False,
            _body_bytes=self.body,
            _properties=encode_properties(properties),
        )


@dataclass(frozen=True)
class Row:
    """
    What C{list} shows of one message (its body is not kept).
    """

    position: int
    id: str | None
    topic: str
    dead_lettered_at: datetime | None
    reason: str
    size: int

    @classmethod
    def of(cls, message: DeadMessage, queue: str) -> Row:
        """
        The row of C{message}, dead-lettered from C{queue}.
        """
        return cls(
            message.position,
            message.id,
            message.routing_key,
            message.dead_lettered_at(queue),
            message.reason(queue),
            len(message.body),
        )


def _time(when: datetime | None) -> str:
    return when.astimezone(timezone.utc).isoformat() if when is not None else "-"


def as_json(row: Row) -> str:
    """
    One row as one JSON object.
    """
    return json.dumps(
        {
            "position": row.position,
            "id": row.id,
            "topic": row.topic,
            "dead_lettered_at": None if row.dead_lettered_at is None else _time(row.dead_lettered_at),
            "reason": row.reason,
            "size": row.size,
        },
        ensure_ascii=True,
        sort_keys=True,
    )


def table(rows: list[Row]) -> list[str]:
    """
    The rows as aligned text lines, a header first; untrusted text escaped.
    """
    lines = [("#", "ID", "TOPIC", "DEAD-LETTERED AT", "REASON")]
    for row in rows:
        lines.append(
            (
                str(row.position),
                escape_control(row.id, 64) if row.id is not None else "-",
                escape_control(row.topic, 100),
                _time(row.dead_lettered_at),
                escape_control(row.reason, 200),
            )
        )
    return runner.aligned(lines)


# --- talking to the broker ------------------------------------------------------


class DeadLetterQueue:
    """
    A dead-letter queue on a channel of its own: messages got from it stay
    unacknowledged until acknowledged here, and closing puts the others
    back where they were.
    """

    def __init__(self, channel: Any, queues: ConsumerQueues) -> None:
        self.channel = channel
        self.client = channel.client
        self.queues = queues
        self.position = 0

    @classmethod
    async def open(cls, bus: Any, queues: ConsumerQueues) -> DeadLetterQueue:
        """
        Open a channel on C{bus}'s connection for C{queues.dead}.
        """
        try:
            channel = await bus.open_channel(exact_content=True)
        except Exception as e:
            raise map_error(e) from None
        return cls(channel, queues)

    async def count(self, queue: str) -> int:
        """
        How many messages C{queue} holds ready (not counting those got and
        not acknowledged).

        @raise CommandError: with C{EX_UNAVAILABLE} when it does not exist.
        """
        try:
            declared = await self.channel.queue_declare(queue=queue, passive=True)
        except Exception as e:
            error = map_error(e)
            if isinstance(error, NotFound):
                raise CommandError(
                    f"queue {queue} of consumer {self.queues.consumer} does not exist on domain "
                    f"{self.queues.domain.name} (the hub declares it when the consumer starts): "
                    f"{error}",
                    EX_UNAVAILABLE,
                ) from None
            raise error from None
        return int(declared.message_count)

    async def get(self) -> DeadMessage | None:
        """
        The next message, unacknowledged, or C{None} when the queue is empty.
        """
        try:
            got = await self.channel.basic_get(queue=self.queues.dead, no_ack=False)
        except Exception as e:
            raise map_error(e) from None
        if got.method.name != "get-ok":
            return None
        self.position += 1
        body = got.content.body
        return DeadMessage(
            self.position,
            got.delivery_tag,
            _text(got.routing_key) or "",
            self.client.python_properties(got.content.properties),
            body.encode("utf-8") if isinstance(body, str) else bytes(body),
        )

    def ack(self, message: DeadMessage) -> bool:
        """
        Remove C{message} from the queue.

        @return: whether the acknowledgement was written (not once the
            channel is closed: the broker has put the message back then).
        """
        return bool(self.client.send_method(self.channel.id, "basic.ack", message.delivery_tag, False))

    async def close(self) -> None:
        """
        Close the channel: every message not acknowledged goes back to the
        queue, in its place.
        """
        await self.client.close_channel(self.channel)


# --- list -------------------------------------------------------------------------


async def list_messages(
    bus: Any, runtime: Runtime, queues: ConsumerQueues, limit: int, as_lines: bool, out: IO[str]
) -> int:
    """
    Print the first C{limit} messages of the dead-letter queue, leaving
    them all in place.
    """
    warn_quorum(queues)
    dead = await DeadLetterQueue.open(bus, queues)
    rows: list[Row] = []
    try:
        count = await dead.count(queues.dead)
        while len(rows) < min(count, limit) and not runtime.interrupted:
            message = await dead.get()
            if message is None:
                break
            rows.append(Row.of(message, queues.queue))
    finally:
        await dead.close()
    if runtime.interrupted:
        return runner.fail(
            "dead-letters", "interrupted; nothing was changed",
            runner.interrupted_status(runtime.signal or 2),
        )
    held = f"{queues.dead} (consumer {queues.consumer}, domain {queues.domain.name}) holds {count} message(s)"
    if len(rows) == limit < count:
        held += f"; the first {len(rows)} are shown (--limit)"
    if as_lines:
        print(held, file=sys.stderr)
        for row in rows:
            print(as_json(row), file=out)
    else:
        print(held, file=out)
        if rows:
            for line in table(rows):
                print(line, file=out)
    return EX_OK


# --- requeue and drop -------------------------------------------------------------


@dataclass
class Progress:
    """
    How far C{requeue} or C{drop} got.

    @ivar count: Messages the queue held when the command started.
    @ivar done: Messages moved (their copies confirmed and the originals
        acknowledged) or dropped.
    @ivar seen: Messages got from the queue.
    @ivar held: Messages got and left in place (not named, or without an id
        to requeue by).
    @ivar in_flight: Copies waiting for their confirms.
    @ivar found: The names that matched.
    @ivar without_id: Messages left in place because they have no message
        id (a copy the broker returned could not be told apart).
    @ivar unacknowledged: Originals whose copies were confirmed but whose
        acknowledgement could not be written (they are in both queues now).
    @ivar failed: The first message the broker did not take, and why.
    @ivar error: What stopped the command otherwise.
    @ivar limit_reached: Whether it stopped looking because C{--limit}
        messages were held.
    """

    count: int = 0
    done: int = 0
    seen: int = 0
    held: int = 0
    in_flight: int = 0
    found: set[str] = field(default_factory=set)
    without_id: int = 0
    unacknowledged: int = 0
    failed: tuple[DeadMessage, BaseException] | None = None
    error: BaseException | None = None
    limit_reached: bool = False

    @property
    def unsettled(self) -> int:
        """
        Messages got and not acknowledged.
        """
        return self.held + self.in_flight


async def act(
    bus: Any,
    runtime: Runtime,
    queues: ConsumerQueues,
    action: str,
    names: list[str] | None,
    limit: int,
    out: IO[str],
) -> int:
    """
    Requeue or drop the messages named (all of them for C{None}) and say
    how many; see the module docstring.
    """
    if names is not None:
        # Those passed over go back; --all puts none back but failures.
        warn_quorum(queues)
    dead = await DeadLetterQueue.open(bus, queues)
    progress = Progress()
    wanted = None if names is None else set(names)
    settled: list[Deferred[None]] = []

    def wait_for_a_confirm() -> Deferred[None]:
        d: Deferred[None] = Deferred()
        settled.append(d)
        return d

    def confirmed(result: object, message: DeadMessage) -> None:
        progress.in_flight -= 1
        if isinstance(result, Failure):
            # The original stays unacknowledged: it goes back with the channel.
            progress.held += 1
            if progress.failed is None:
                progress.failed = (message, result.value or RuntimeError("unknown failure"))
        elif dead.ack(message):
            progress.done += 1
        else:
            progress.unacknowledged += 1
        waiters, settled[:] = settled[:], []
        for d in waiters:
            d.callback(None)

    try:
        progress.count = await dead.count(queues.dead)
        if action == "requeue":
            await dead.count(queues.queue)
    except BaseException:
        await dead.close()
        raise
    try:
        while progress.seen < progress.count:
            if runtime.interrupted or progress.failed is not None:
                break
            if progress.unsettled >= limit:
                if not progress.in_flight:
                    progress.limit_reached = True
                    break
                await wait_for_a_confirm()
                continue
            message = await dead.get()
            if message is None:
                break
            progress.seen += 1
            message_id = message.id
            if wanted is not None and message_id not in wanted:
                progress.held += 1
                continue
            if message_id is not None:
                progress.found.add(message_id)
            if action == "drop":
                if dead.ack(message):
                    progress.done += 1
                else:
                    progress.unacknowledged += 1
                continue
            if message_id is None:
                progress.held += 1
                progress.without_id += 1
                continue
            try:
                copy = message.copy()
            except Exception as e:
                progress.held += 1
                progress.failed = (message, e)
                break
            progress.in_flight += 1
            publishing = bus.publish(copy, exchange=queues.return_exchange, routing_key=message.routing_key)
            publishing.addBoth(confirmed, message)
    except Exception as e:
        progress.error = e
    finally:
        while progress.in_flight:
            await wait_for_a_confirm()
        await dead.close()
    return report(runtime, queues, action, names, limit, progress, out)


def report(
    runtime: Runtime,
    queues: ConsumerQueues,
    action: str,
    names: list[str] | None,
    limit: int,
    progress: Progress,
    out: IO[str],
) -> int:
    """
    Say how far C{requeue} or C{drop} got, and return the exit status.
    """
    if action == "requeue":
        done = f"{progress.done} message(s) moved from {queues.dead} to {queues.queue}"
    else:
        done = f"{progress.done} message(s) dropped from {queues.dead}"
    if progress.unacknowledged:
        # The channel closed under the acknowledgements: the broker put
        # those originals back (a requeued one is in both queues now).
        done += f"; {progress.unacknowledged} more could not be acknowledged and stay in {queues.dead}"
        if action == "requeue":
            done += " (their copies are in the consumer's queue too)"
    if progress.failed is not None:
        message, error = progress.failed
        status, reason = runner.status_of(error)
        what = escape_control(message.id or "without id", 64)
        topic = escape_control(message.routing_key, 100)
        return runner.fail("dead-letters", f"message {what} ({topic}): {reason}; {done}", status)
    if progress.error is not None:
        status, reason = runner.status_of(progress.error)
        return runner.fail("dead-letters", f"{reason}; {done}", status)
    if runtime.interrupted:
        return runner.fail(
            "dead-letters", f"interrupted; {done}", runner.interrupted_status(runtime.signal or 2)
        )
    print(done, file=out)
    problems: list[str] = []
    if names is not None:
        missing = [name for name in dict.fromkeys(names) if name not in progress.found]
        if missing:
            where = (
                f" among the first {progress.seen} message(s) (--limit {limit} are held at most)"
                if progress.limit_reached else ""
            )
            problems.append(f"not found{where}: {', '.join(escape_control(m, 64) for m in missing)}")
    elif progress.limit_reached:
        problems.append(f"stopped after {progress.seen} message(s): --limit {limit} are held at most")
    if progress.without_id:
        problems.append(
            f"{progress.without_id} message(s) without a message id left in {queues.dead} "
            "(a copy the broker returned could not be told apart; drop them, or move them by hand)"
        )
    if problems:
        return runner.fail("dead-letters", "; ".join(problems), EX_NOTFOUND)
    return EX_OK


# --- the command -------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Arguments of C{fedhub dead-letters}.
    """
    timeout_help = "seconds to wait for the connection, and for each confirm"
    runner.add_broker_arguments(parser, timeout_help, domain=False)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser(
        "list", help="list a consumer's dead-lettered messages, leaving them in place",
        description="List a consumer's dead-lettered messages, oldest first, leaving them in place.",
    )
    listing.add_argument("consumer", metavar="CONSUMER", help="the consumer's name in the configuration")
    listing.add_argument(
        "--limit", type=positive_int, default=LIST_LIMIT, metavar="N",
        help=f"show the first N messages (default {LIST_LIMIT})",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    runner.add_broker_arguments(listing, timeout_help, inner=True, domain=False)
    for name, summary in (
        ("requeue", "move dead-lettered messages back into the consumer's queue, their retries afresh"),
        ("drop", "delete dead-lettered messages for good"),
    ):
        action = actions.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        action.add_argument("consumer", metavar="CONSUMER", help="the consumer's name in the configuration")
        action.add_argument("ids", nargs="*", metavar="ID", help="message ids")
        action.add_argument("--all", action="store_true", help="every message the queue holds now")
        action.add_argument(
            "--limit", type=positive_int, default=ACT_LIMIT, metavar="N",
            help=f"hold at most N messages unacknowledged at once (default {ACT_LIMIT})",
        )
        runner.add_broker_arguments(action, timeout_help, inner=True, domain=False)


def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """
    List, requeue or drop; exit 1 when some of the named messages were not
    found (the others are acted on).
    """
    try:
        return _run(args, out or sys.stdout)
    except CommandError as e:
        return runner.fail("dead-letters", e.reason, e.status)


def _run(args: argparse.Namespace, out: IO[str]) -> int:
    action: str = args.action
    names = None if action == "list" else runner.names_or_all(args, "ID")
    config = runner.read_config(args.config)
    queues = consumer_of(config, args.consumer)

    async def work(runtime: Runtime) -> int:
        async def on_bus(bus: Any) -> int:
            if action == "list":
                return await list_messages(bus, runtime, queues, args.limit, args.json, out)
            return await act(bus, runtime, queues, action, names, args.limit, out)

        return await runner.with_bus(
            "dead-letters", runtime, queues.domain, args.timeout,
            lambda bus: Deferred.fromCoroutine(on_bus(bus)),
            publishing=action == "requeue",
            max_in_flight=min(args.limit, queues.domain.confirm_window),
        )

    return runner.run("dead-letters", work, verbose=args.verbose)
