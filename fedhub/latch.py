"""
L{Latch}: something that happens once, which any number of parties may wait
for (a connection being gone, every confirm being in, a service having
stopped).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

__all__ = ["Latch"]


class Latch:
    """
    Something that happens once; any number of parties may wait for it.

    @ivar fired: Whether it happened.
    """

    def __init__(self) -> None:
        self.fired = False
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        """
        A Deferred firing once it has happened (at once if it has).
        """
        if self.fired:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def fire(self) -> None:
        """
        It happened: fire every waiter (only the first call does anything).
        """
        if self.fired:
            return
        self.fired = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
