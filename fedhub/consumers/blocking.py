"""
Noticing a consumer plugin that blocks the event loop.

A plugin's C{start()}, C{handle()}, C{drain()}, C{abandon()} and C{stop()}
run in the hub's event loop, which every producer, consumer and broker
connection of the hub shares: while one of them runs, no other message is
handled, nothing is published and no acknowledgement goes out.  The
consumer runner times each of these calls, the part that runs before the
call returns (for a coroutine, up to its first C{await}), with a monotonic
clock; nothing interrupts a call.  A call that took longer than the
consumer's C{blocking_warning} is counted (L{BlockingCalls.counts}, the
C{fedhub_consumer_blocking_calls_total} metric) and logged as a warning
naming the consumer, the call and how long it took: the first at once,
then, while calls go on blocking, one summary line at most every
L{SUMMARY_INTERVAL} seconds, so that a plugin that always blocks does not
write a line per message.

Work a plugin does later, in the callbacks of a Deferred it returned or
after an C{await}, is not timed: the hub can not tell whose it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from fedhub.logs import HubLogger

__all__ = ["CALLS", "SUMMARY_INTERVAL", "BlockingCalls"]

#: The calls into a plugin that are timed.
CALLS: Final = ("start", "handle", "drain", "abandon", "stop")

#: Seconds, at least, between two lines about one consumer's blocking calls.
SUMMARY_INTERVAL: Final = 60.0


class BlockingCalls:
    """
    Times one consumer's calls into its plugin, counts and logs those that
    held the event loop longer than C{threshold} seconds.

    @ivar consumer: The consumer's name, in the log lines.
    @ivar threshold: Seconds a call may take without being counted.
    @ivar counts: The calls that took longer, by call (one of L{CALLS}).
    """

    log = HubLogger()

    def __init__(
        self,
        consumer: str,
        threshold: float,
        clock: IReactorTime,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        @param clock: Schedules the summary lines.
        @param monotonic: Times the calls; never the reactor's clock, which
            the call being timed holds still (a fake one in tests).
        @raise ValueError: C{threshold} is not a number greater than 0.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"blocking_warning must be a number greater than 0, not {threshold!r}")
        self.consumer = consumer
        self.threshold = float(threshold)
        self.clock = clock
        self.now = monotonic
        self.counts = dict.fromkeys(CALLS, 0)
        # While set, lines are held back: the calls that blocked since the
        # last line are summed up when it fires.
        self._summary: IDelayedCall | None = None
        self._held = 0
        self._longest = 0.0
        self._longest_call = ""

    def ended(self, call: str, began: float) -> None:
        """
        A call into the plugin that began at C{began} (a reading of
        C{now()}) returned: count and log it if it took too long.
        """
        took = self.now() - began
        if took > self.threshold:
            self._blocked(call, took)

    def _blocked(self, call: str, took: float) -> None:
        self.counts[call] += 1
        if self._summary is None:
            self.log.warn(
                "Consumer {consumer}: its plugin's {call}() held the event loop for {seconds:.3f} s "
                "(its blocking_warning is {threshold:g} s); nothing else in the hub ran "
                "meanwhile: a plugin must not block",
                consumer=self.consumer,
                call=call,
                seconds=took,
                threshold=self.threshold,
            )
            self._summary = self.clock.callLater(SUMMARY_INTERVAL, self._summarize)
            return
        self._held += 1
        if took > self._longest:
            self._longest, self._longest_call = took, call

    def _summarize(self) -> None:
        """
        L{SUMMARY_INTERVAL} passed since the last line: sum up the calls
        that blocked since, if any, and hold back lines for another
        interval; if none did, the next one is logged at once.
        """
        self._summary = None
        if self._held:
            self._log_summary()
            self._summary = self.clock.callLater(SUMMARY_INTERVAL, self._summarize)

    def _log_summary(self) -> None:
        self.log.warn(
            "Consumer {consumer}: {count} more call(s) into its plugin held the event loop "
            "longer than {threshold:g} s since the last warning; the longest, {call}(), "
            "for {seconds:.3f} s",
            consumer=self.consumer,
            count=self._held,
            threshold=self.threshold,
            call=self._longest_call,
            seconds=self._longest,
        )
        self._held, self._longest, self._longest_call = 0, 0.0, ""

    def stop(self) -> None:
        """
        The consumer stopped: sum up what is held back now, and schedule
        nothing more.
        """
        if self._summary is not None:
            if self._summary.active():
                self._summary.cancel()
            self._summary = None
        if self._held:
            self._log_summary()
