"""
Embed fedhub's Bugzilla mail listener in your own Twisted application.

The listener is an ordinary Twisted service.  Give it a callback and it calls
it once per Bugzilla bug event, with the parsed event and the raw mail; copies
of one event sent to other recipients are recognized and dropped.  It answers
the sending mail server only after the callback's Deferred fired:

  - fired with anything: C{250}, the sender forgets the mail;
  - failed with C{fedhub.errors.TemporarilyUnavailable}: C{451}, the sender
    retries later (and the event is offered again); C{452} when it says
    storage is full;
  - failed with C{fedhub.errors.MessageError}: C{550}; with another
    C{fedhub.errors.PublishError}: C{554}, the mail bounces;
  - failed with anything else: C{451}, and the failure is logged.

Run it:

    python examples/bugzilla-mail/embed.py                  # tcp:8025 on 127.0.0.1
    python examples/bugzilla-mail/embed.py tcp:2525:interface=127.0.0.1

and send it a bugmail, for example with Python's smtplib:

    python3 -c 'import re, smtplib, sys; smtplib.SMTP("127.0.0.1", 8025).sendmail(
        "bugzilla-daemon@localhost", ["bugs@localhost"],
        re.sub(rb"\\r?\\n", b"\\r\\n", open(sys.argv[1], "rb").read()))' \\
        tests/data/bugzilla/04_changed_status_resolution_with_comment.eml

To publish fedhub messages instead of calling your own code, build the
listener with C{BugmailListener.with_publisher(endpoint, settings,
publisher, topic)} and any L{fedhub.interfaces.IPublisher}.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver

from fedhub.errors import TemporarilyUnavailable
from fedhub.producers.bugzilla.parser import BugEvent
from fedhub.producers.bugzilla.smtp import DEFAULT_ENDPOINT, BugmailListener, ListenerSettings
from fedhub.text import escape_control

#: The address this example accepts mail for.
RECIPIENT = "bugs@localhost"


class BugBoard:
    """
    Your application's own code: here it keeps the latest summary of every
    bug it heard of, and refuses (temporarily) when it is full.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.summaries: dict[int, str] = {}

    def on_event(self, event: BugEvent, raw: bytes) -> Deferred[None]:
        """
        The listener's callback.  Everything in the event comes from a mail:
        treat it as untrusted text (escape it before printing).
        """
        if len(self.summaries) >= self.capacity and event.bug_id not in self.summaries:
            # The sender keeps the mail and retries later.
            failed: Deferred[None] = Deferred()
            failed.errback(TemporarilyUnavailable("the board takes no new bugs now"))
            return failed
        line = escape_control(event.summary_line(), 200)
        self.summaries[event.bug_id] = line
        print(f"bug {event.bug_id} ({event.event_type}): {line}", flush=True)
        done: Deferred[None] = Deferred()
        done.callback(None)
        return done


def make_listener(endpoint: str, board: BugBoard, reactor: Any) -> BugmailListener:
    """
    The listener, ready to be started or added to a service tree.
    """
    settings = ListenerSettings(
        recipients=frozenset({RECIPIENT}),
        hostname="bugs.localhost",
        allowed_networks=("127.0.0.0/8", "::1/128"),
        max_message_size=512 * 1024,
    )
    return BugmailListener.with_callback(endpoint, settings, board.on_event, reactor=reactor)


def main(reactor: Any, endpoint: str = DEFAULT_ENDPOINT) -> Deferred[None]:
    """
    Listen until interrupted.
    """
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    listener = make_listener(endpoint, BugBoard(), reactor)
    listener.startService()
    reactor.addSystemEventTrigger("before", "shutdown", listener.stopService)

    def listening(port: Any) -> None:
        address = port.getHost()
        print(f"Send Bugzilla mail for {RECIPIENT} to {address.host}:{address.port}; Ctrl-C stops.", flush=True)

    listener.when_listening().addCallback(listening)
    forever: Deferred[None] = Deferred()
    return forever


if __name__ == "__main__":
    react(main, sys.argv[1:2])
