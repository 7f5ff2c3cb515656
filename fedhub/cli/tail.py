"""
Follow a domain's bus and print the messages on it.

C{fedhub tail} declares a temporary queue of its own (C{fedhub.tail.<uuid>}:
exclusive, auto-delete, not durable: the broker deletes it when the command
ends), binds it to the domain's exchange for each C{--topic} pattern (default
C{#}: everything) and prints each message as it arrives.  The queue holds at
most C{--max-backlog} messages (default 100,000): when the reader falls that
far behind, the broker drops the oldest rather than letting a forgotten
terminal grow the broker's memory.  Formats:

  - C{terse} (default): one line per message: send time, topic, summary;
  - C{pretty}: the topic, id, managed headers, extra headers and the body,
    indented;
  - C{json}: the serialized form, one JSON object per line (what
    C{fedhub record} writes and C{fedhub publish --file} reads).

Control characters in untrusted text are escaped in every format, so a
message can not drive the terminal; characters the terminal's encoding
lacks (on a terminal that is not UTF-8) are written as C{\\uXXXX} escapes,
which in the C{json} format leave the same JSON value.  C{--exclude},
C{--user} and C{--package} filter further.  The command exits 0 after
C{--count} messages, and on SIGINT (Ctrl-C) or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.logger import LogLevel

from fedhub.cli import runner
from fedhub.cli.runner import EX_OK, EX_USAGE, CommandError, Runtime, positive_int
from fedhub.config import DomainConfig, check_topic_pattern
from fedhub.consumers.log import format_line
from fedhub.interfaces import IDelivery
from fedhub.message import Message, dump_line, escape_surrogates, format_sent_at
from fedhub.text import escape_control
from fedhub.topology import BindingSpec, QueueSpec, Topology, topic_matches

#: The header fedora-messaging sets for each user a message concerns.
USER_HEADER = "fedora_messaging_user_"
#: The header fedora-messaging sets for each package a message concerns.
PACKAGE_HEADER = "fedora_messaging_rpm_"

#: Deliveries the broker sends ahead of the one being printed.
PREFETCH = 100

#: Messages the temporary queue holds, at most, unless --max-backlog says.
MAX_BACKLOG = 100_000

FORMATS = ("terse", "pretty", "json")


# --- filters and formats ---------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """
    Which of the messages the queue receives are shown.

    @ivar exclude: Topic patterns never shown.
    @ivar users: When not empty, only messages concerning one of these users
        (header C{fedora_messaging_user_<name>}).
    @ivar packages: When not empty, only messages concerning one of these
        packages (header C{fedora_messaging_rpm_<name>}).
    """

    exclude: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()

    def accepts(self, message: Message) -> bool:
        """
        Whether C{message} passes: no exclusion matches, and it concerns one
        of the users and one of the packages asked for (when asked).
        """
        if any(topic_matches(pattern, message.topic) for pattern in self.exclude):
            return False
        headers = message.headers
        if self.users and not any(headers.get(USER_HEADER + user) for user in self.users):
            return False
        if self.packages and not any(headers.get(PACKAGE_HEADER + p) for p in self.packages):
            return False
        return True


#: C1 controls: JSON leaves them raw, terminals act on them.  (The line
#: and paragraph separators are escaped by dump_line already.)
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f]")


def format_json(message: Message) -> str:
    """
    The serialized form on one line, newline included.  Characters JSON
    leaves raw but terminals act on (C1 controls; line and paragraph
    separators, as L{dump_line} writes them) are written as C{\\uXXXX}
    escapes: the same JSON value.
    """
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", dump_line(message))


def format_terse(message: Message) -> str:
    """
    One line: send time, topic, summary (as the C{log} consumer writes it).
    """
    return escape_surrogates(format_line(message)) + "\n"


def format_pretty(message: Message) -> str:
    """
    A block of indented lines, then an empty line.
    """

    def value(item: object) -> str:
        return json.dumps(item, ensure_ascii=False, sort_keys=True, default=str)

    lines = [
        message.topic,
        f"  id:        {message.id}",
        f"  sent-at:   {format_sent_at(message.sent_at) if message.sent_at is not None else '-'}",
        f"  schema:    {message.schema}",
        f"  severity:  {message.severity}",
    ]
    if message.priority:
        lines.append(f"  priority:  {message.priority}")
    if message.headers:
        lines.append("  headers:")
        for name in sorted(message.headers):
            lines.append(f"    {name}: {value(message.headers[name])}")
    lines.append("  body:")
    body = json.dumps(message.body, ensure_ascii=False, sort_keys=True, indent=2, default=str)
    lines.extend("    " + line for line in body.split("\n"))
    return escape_surrogates("".join(escape_control(line) + "\n" for line in lines) + "\n")


FORMATTERS: dict[str, Callable[[Message], str]] = {
    "terse": format_terse,
    "pretty": format_pretty,
    "json": format_json,
}


# --- following -----------------------------------------------------------------


def check_patterns(option: str, patterns: list[str]) -> tuple[str, ...]:
    """
    Check topic patterns given on the command line.

    @raise CommandError: with C{EX_USAGE} for an invalid one.
    """
    for pattern in patterns:
        problem = check_topic_pattern(pattern)
        if problem is not None:
            raise CommandError(f"{option}: {problem}", EX_USAGE)
    return tuple(patterns)


def tail_topology(
    queue: str, exchange: str, topics: tuple[str, ...], max_backlog: int = MAX_BACKLOG
) -> Topology:
    """
    The temporary queue of a tail and its bindings; the queue drops its
    oldest messages beyond C{max_backlog}.
    """
    arguments = {"x-max-length": max_backlog, "x-overflow": "drop-head"}
    return Topology(
        queues=(QueueSpec(queue, durable=False, exclusive=True, auto_delete=True,
                          arguments=arguments),),
        bindings=tuple(BindingSpec(queue, exchange, topic) for topic in topics),
    )


class Follower:
    """
    Handles the deliveries of a tail: filters them, hands the shown ones to
    C{show}, acknowledges, and says when it is done.

    @ivar shown: Messages shown so far.
    @ivar pipe_closed: Whether C{show} found its reader gone.
    @ivar done: Fires with the exit status once C{count} messages were
        shown, or C{show} raised (a closed pipe ends it with 0, a
        L{CommandError} with its status, anything else with a
        L{CommandError} of the status L{runner.status_of} gives).
    """

    def __init__(
        self, show: Callable[[Message], None], accept: Filter, count: int | None = None
    ) -> None:
        self.show = show
        self.accept = accept
        self.count = count
        self.shown = 0
        self.pipe_closed = False
        self.done: Deferred[int] = Deferred()

    def __call__(self, delivery: IDelivery) -> None:
        if self.done.called:
            # Finishing: the queue goes away with the connection.
            return
        message: Message = delivery.message
        if self.accept.accepts(message):
            try:
                self.show(message)
            except BrokenPipeError:
                self.pipe_closed = True
                self.done.callback(EX_OK)
                return
            except CommandError as e:
                self.done.errback(e)
                return
            except Exception as e:
                # Whatever else the output raises ends the command with one
                # line: left to the bus, it would only be logged, and the
                # command would wait on without this message.
                status, reason = runner.status_of(e)
                self.done.errback(CommandError(f"message {message.id}: {reason}", status))
                return
            self.shown += 1
        delivery.ack()
        if self.count is not None and self.shown >= self.count:
            self.done.callback(EX_OK)


async def follow(
    command: str,
    runtime: Runtime,
    domain: DomainConfig,
    topics: tuple[str, ...],
    follower: Follower,
    *,
    timeout: float,
    quiet: bool,
    max_backlog: int = MAX_BACKLOG,
    notice: IO[str] | None = None,
) -> int:
    """
    Follow C{domain} until the follower is done or a signal arrives.
    """
    queue = f"fedhub.{command}.{uuid.uuid4()}"

    async def consume(bus: Any) -> int:
        await bus.declare(tail_topology(queue, domain.exchange, topics, max_backlog))
        await bus.subscribe(queue, follower, PREFETCH)
        if not quiet:
            print(
                f"fedhub {command}: following {', '.join(topics)} on exchange "
                f"{domain.exchange} of domain {domain.name} ({bus.settings.safe_url()}); "
                "Ctrl-C stops",
                file=notice or sys.stderr,
                flush=True,
            )
        # From now on, reconnects and lost connections are worth knowing about.
        runtime.show_log(LogLevel.warn)
        which, status = await runner.first_of(follower.done, runtime.when_interrupted())
        if which == 1:
            # Ctrl-C is the ordinary way to stop following.
            follower.done.addErrback(lambda _: None)
            return EX_OK
        return int(status)

    return await runner.with_bus(
        command, runtime, domain, timeout,
        lambda bus: Deferred.fromCoroutine(consume(bus)),
        passive_declares=False,
    )


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """
    The topic, filter and count options of C{tail} and C{record}.
    """
    parser.add_argument(
        "--topic", action="append", default=[], metavar="PATTERN",
        help="follow topics matching PATTERN (* one word, # any words; repeatable; default #)",
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="skip topics matching PATTERN (repeatable)",
    )
    parser.add_argument(
        "--user", action="append", default=[], metavar="NAME",
        help="only messages concerning this user (header fedora_messaging_user_NAME; repeatable)",
    )
    parser.add_argument(
        "--package", action="append", default=[], metavar="NAME",
        help="only messages concerning this package (header fedora_messaging_rpm_NAME; repeatable)",
    )
    parser.add_argument(
        "-n", "--count", type=positive_int, default=None, metavar="N",
        help="exit after N messages",
    )
    parser.add_argument(
        "--max-backlog", type=positive_int, default=MAX_BACKLOG, metavar="N",
        help="messages the broker keeps for this command while it falls behind; "
        f"beyond, the oldest are dropped (default {MAX_BACKLOG})",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true",
        help="no notice on standard error once following",
    )
    runner.add_broker_arguments(parser, "seconds to wait for the connection")


def filter_of(args: argparse.Namespace) -> tuple[tuple[str, ...], Filter]:
    """
    The topics and the filter the options ask for.

    @raise CommandError: with C{EX_USAGE} for an invalid pattern.
    """
    topics = check_patterns("--topic", args.topic or ["#"])
    exclude = check_patterns("--exclude", args.exclude)
    return topics, Filter(exclude, tuple(args.user), tuple(args.package))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Arguments of C{fedhub tail}.
    """
    parser.add_argument(
        "--format", choices=FORMATS, default="terse",
        help="terse: one line per message; pretty: headers and indented body; "
        "json: the serialized form (default terse)",
    )
    add_filter_arguments(parser)


def silence_stdout() -> None:
    """
    After the reader of standard output went away: send what Python still
    flushes at exit nowhere, instead of failing again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def run(args: argparse.Namespace) -> int:
    """
    Follow and print until the count is reached or a signal arrives (exit 0).
    """
    try:
        topics, accept = filter_of(args)
        config = runner.read_config(args.config)
        domain = runner.domain_of(config, args.domain)
    except CommandError as e:
        return runner.fail("tail", e.reason, e.status)
    formatter = FORMATTERS[args.format]
    out = sys.stdout

    def show(message: Message) -> None:
        out.write(formatter(message))
        out.flush()

    follower = Follower(show, accept, args.count)

    async def work(runtime: Runtime) -> int:
        return await follow(
            "tail", runtime, domain, topics, follower, timeout=args.timeout, quiet=args.quiet,
            max_backlog=args.max_backlog,
        )

    try:
        return runner.run("tail", work, verbose=args.verbose)
    finally:
        if follower.pipe_closed:
            silence_stdout()
