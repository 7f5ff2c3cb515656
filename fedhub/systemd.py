"""
systemd integration: C{Type=notify} readiness and the watchdog.

When systemd starts the hub with C{Type=notify}, it sets C{NOTIFY_SOCKET};
the hub then sends C{READY=1} once it runs, C{WATCHDOG=1} every half
C{WatchdogSec} while the reactor turns (a hung reactor stops the pings and
systemd restarts the hub), C{STATUS=...} lines an operator sees in
C{systemctl status}, and C{STOPPING=1} when it drains.  Without
C{NOTIFY_SOCKET} nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

from fedhub.logs import HubLogger
from fedhub.text import ascii_digits


class Notifier:
    """
    Sends datagrams to systemd's notification socket.

    @ivar address: The socket address (a path, or an abstract name starting
        with C{@}), or C{None} when not run by systemd.
    @ivar dropped: Notifications dropped because the socket's queue was full.
    """

    log = HubLogger()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.address = environ.get("NOTIFY_SOCKET") or None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        self.dropped = 0
        if ascii_digits(usec) and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1_000_000 / 2

    def notify(self, *assignments: str) -> bool:
        """
        Send C{KEY=value} lines.  Failures are logged, never raised: the hub
        must not stop because systemd went away.  The send never waits: a
        datagram the socket's queue has no room for (systemd busy or stuck)
        is dropped and counted in L{dropped}, since waiting would stop the
        reactor; the first drop is logged.

        @return: Whether the datagram was sent.
        """
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(assignments).encode("utf-8"), target)
        except BlockingIOError:
            self.dropped += 1
            if self.dropped == 1:
                self.log.warn(
                    "systemd notification dropped: its socket's queue is full; further "
                    "drops are counted, not logged"
                )
            return False
        except OSError as e:
            self.log.warn("systemd notification failed: {error}", error=str(e))
            return False
        return True


class NotifyService(Service):
    """
    Tells systemd when the hub is ready, keeps its watchdog fed, and says
    when it stops.
    """

    def __init__(self, reactor: Any, notifier: Notifier | None = None) -> None:
        self.reactor = reactor
        self.notifier = notifier or Notifier()
        self._watchdog: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.notifier.address is not None:
            self.reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        self.notifier.notify("READY=1", "STATUS=fedhub running")
        if self.notifier.watchdog_interval is not None:
            self._watchdog = LoopingCall(self.notifier.notify, "WATCHDOG=1")
            self._watchdog.clock = self.reactor
            self._watchdog.start(self.notifier.watchdog_interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        # systemd watches the watchdog only while the unit is running: once
        # it is stopping (systemctl stop, or the STOPPING=1 below) the drain
        # is bounded by TimeoutStopSec instead, so the pings can end here.
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self.notifier.notify("STOPPING=1", "STATUS=fedhub draining")
