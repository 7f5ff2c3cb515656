"""
Publish again the messages of a file written by `fedhub record`, keeping their ids.

Every message of FILE (the serialized form, one per line; C{-} reads standard
input) is published to the domain's broker with publisher confirms, exactly
as C{fedhub publish --file} does: persistent, C{mandatory}, at most
C{--window} unconfirmed, stopping at the first refusal or bad line.  Message
ids, send times and headers are kept, so consumers recognize a message they
have seen; C{--new-ids} gives every message a fresh id instead (the send time
stays the original one).  C{--rate R} publishes at most R messages a second.

Replay talks to the broker directly rather than through the hub's outbox:
the outbox belongs to the running hub (its store is locked while the hub
runs), and a command that waits for every confirm and says which line
failed gives the same guarantee without it.  The exit status says whether
everything was confirmed; see C{docs/cli.md}.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

from twisted.internet.defer import Deferred

from fedhub.cli import runner
from fedhub.cli.publish import LineReader, file_messages, open_input, publish_all, report
from fedhub.cli.runner import EX_OK, CommandError, Runtime, positive_float, positive_int
from fedhub.message import Message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Arguments of C{fedhub replay}.
    """
    parser.add_argument("file", metavar="FILE", help="the recorded messages (- for standard input)")
    parser.add_argument(
        "--rate", type=positive_float, default=None, metavar="R",
        help="publish at most R messages per second (default: as fast as the broker confirms)",
    )
    parser.add_argument(
        "--new-ids", action="store_true",
        help="give every message a new id instead of keeping the recorded one",
    )
    parser.add_argument(
        "--window", type=positive_int, default=None, metavar="N",
        help="at most N messages unconfirmed at once (default: the domain's confirm_window)",
    )
    runner.add_broker_arguments(parser, "seconds to wait for the connection, and for each confirm")


def new_id(message: Message) -> Message:
    """
    The same message with a fresh id.
    """
    return message.evolve(id=str(uuid.uuid4()))


def run(args: argparse.Namespace) -> int:
    """
    Replay, and exit with 0 once every message is confirmed.
    """
    try:
        config = runner.read_config(args.config)
        domain = runner.domain_of(config, args.domain)
        stream = open_input(args.file)
    except CommandError as e:
        return runner.fail("replay", e.reason, e.status)
    window = args.window or domain.confirm_window
    rate = args.rate
    if rate is not None and args.window is None:
        # Paced publishing needs no more in flight than a few seconds' worth.
        window = max(1, min(window, int(rate * 5) + 1))

    async def work(runtime: Runtime) -> int:
        async def replay(bus: Any) -> int:
            reader = LineReader(stream, runtime.reactor)
            reader.start()
            runtime.when_interrupted().addCallback(lambda _: reader.stop())
            progress = await publish_all(
                bus,
                file_messages(reader, new_id if args.new_ids else None),
                runtime.reactor,
                window=window,
                rate=rate,
                stop=lambda: runtime.interrupted,
            )
            status = report("replay", progress, runtime, single=False)
            if status == EX_OK and args.verbose:
                print(f"fedhub replay: {progress.confirmed} message(s) confirmed", file=sys.stderr)
            return status

        return await runner.with_bus(
            "replay", runtime, domain, args.timeout,
            lambda bus: Deferred.fromCoroutine(replay(bus)),
            publishing=True,
            max_in_flight=window,
        )

    return runner.run("replay", work, verbose=args.verbose)
