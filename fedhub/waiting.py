"""
Waiting for a Deferred at most so long, without cancelling it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

__all__ = ["with_timeout"]

_T = TypeVar("_T")


def with_timeout(
    d: Deferred[_T], timeout: float, clock: IReactorTime, error: Callable[[], Exception]
) -> Deferred[_T]:
    """
    A Deferred with C{d}'s result, or failing with C{error()} when C{d} has
    not fired within C{timeout} seconds.

    Unlike C{Deferred.addTimeout}, C{d} itself is never cancelled: its
    owner may still fire it later (a bus a confirm that arrives late, a
    service a stop that ends late), and a cancelled one would then be fired
    twice.
    """
    result: Deferred[_T] = Deferred()
    call: IDelayedCall | None = None

    def expire() -> None:
        nonlocal call
        call = None
        if not result.called:
            result.errback(error())

    def done(outcome: _T | Failure) -> None:
        if call is not None and call.active():
            call.cancel()
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

    if timeout > 0:
        call = clock.callLater(timeout, expire)
    d.addBoth(done)
    return result
