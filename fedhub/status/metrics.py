"""
What a running hub tells its operator in numbers: a L{HubMonitor} watches
one hub and exports Prometheus metrics through a registry of its own.

Most numbers are read from the hub's components at scrape time (the outboxes'
L{stats<fedhub.outbox.outbox.Outbox.stats>}, the buses' counters, the
consumers' C{stats}, the pollers' C{status()}, the SMTP listeners'
C{counters}), so a scrape always shows the state of that moment and nothing
is counted twice.  What the components do not keep, the monitor gathers
while attached, from the consumers' L{Settled} reports: how long handlers
take (a histogram per consumer), when a domain last saw a message, and the
last trouble of each consumer.  It also tells listeners about every outcome it
observes, which feeds the status page's list of recent messages.

Every metric is prefixed C{fedhub_}; labels are C{domain}, C{consumer},
C{producer} and, where the numbers split, C{outcome}, C{reason},
C{direction} or C{event}.  The registry is never Prometheus' global one, so
several hubs in one process (tests) do not collide.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime

from fedhub.consumers.runner import ConsumerService, Settled
from fedhub.hub import DomainRuntime
from fedhub.logs import HubLogger
from fedhub.message import Message
from fedhub.outbox.outbox import OutboxStats
from fedhub.text import escape_control

__all__ = [
    "HANDLING_BUCKETS",
    "Activity",
    "ConsumerNotes",
    "HubMonitor",
    "HubView",
    "Readiness",
    "readiness",
]

#: Bucket bounds (seconds) of the handling-time histogram: from a log line
#: to a slow webhook or command.
HANDLING_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Consumer outcomes that count as trouble on the status page.
TROUBLE = frozenset({"dead_lettered", "retried", "rejected", "requeued", "dropped"})

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_CONSUMER_COUNTERS = {
    "consumed": "Deliveries handed to the consumer",
    "acked": "Deliveries acknowledged after the handler succeeded",
    "dropped": "Deliveries dropped by a Drop verdict or policy",
    "retried": "Deliveries replaced by a confirmed copy in a retry queue",
    "dead_lettered": "Deliveries replaced by a confirmed copy in the dead-letter queue",
    "invalid": "Deliveries whose body failed its schema",
    "failed": "Handler calls that raised something other than a verdict",
    "requeued": "Deliveries returned to the queue (halt, stop, a failed settle)",
    "rejected": "Deliveries left to the broker to dead-letter because their copy could not be published",
    "unsettled": "Verdicts dropped because the delivery's channel had closed (delivered again)",
}

_SMTP_ACCEPTED = ("published", "duplicate", "quarantined")


class HubView(Protocol):
    """
    What the status server reads of a hub; L{fedhub.hub.Hub} provides it.
    """

    @property
    def domains(self) -> Mapping[str, DomainRuntime]:
        """The runtime of every domain, by name."""

    @property
    def consumers(self) -> Mapping[str, ConsumerService]:
        """The consumer services, by component name."""

    @property
    def producers(self) -> Mapping[str, IService]:
        """The producer services, by component name."""

    @property
    def start_failures(self) -> Mapping[str, str]:
        """Why the services whose start failed did, by service name."""


@dataclass(frozen=True)
class Readiness:
    """
    Whether a hub can do its work: every domain's bus is connected, its
    outbox usable and its publishes not refused, every consumer consumes
    (none halted) and no producer's start failed.

    @ivar ready: The verdict.
    @ivar domains: By domain: C{ready}, C{connected}, C{transport}
        (C{"memory"} or C{"amqp"}), C{blocked} when the bus can tell,
        C{error}: the last connection attempt's error or the lost
        connection's, L{NOT_CONNECTED_YET} while an AMQP bus is not
        connected and no attempt has failed yet, or C{None};
        C{outbox_error}: why its outbox can not be used, or can not read
        its backlog back, or C{None}; and, while the broker refuses its
        publishes, C{publish_refused}.
    @ivar consumers: By consumer: C{ready}, C{domain}, C{consuming},
        C{halted}, and C{error}: why its last attempt to start failed, why
        the broker does not let it consume (it tries again in both cases),
        the message it halted on and why, or that its domain is not
        connected; or C{None}.
    @ivar producers: By producer: C{ready} (its start did not fail),
        C{running}, and C{error}: why its start failed (the hub's record,
        or the service's own C{start_error}: a listener that could not
        bind), or C{None}.
    """

    ready: bool
    domains: dict[str, dict[str, Any]]
    consumers: dict[str, dict[str, Any]]
    producers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """
        The verdict and its details as a JSON-ready dictionary.
        """
        return {
            "ready": self.ready,
            "domains": self.domains,
            "consumers": self.consumers,
            "producers": self.producers,
        }


def producer_failure(hub: HubView, producer: IService) -> str | None:
    """
    Why a producer did not start, or C{None}: its C{startService} failed
    (the hub's C{start_failures}), or it says so itself (C{start_error}: a
    listener that could not bind).
    """
    failure: str | None = hub.start_failures.get(producer.name) or getattr(
        producer, "start_error", None
    )
    return failure


#: A domain's error on C{/ready} while it is not connected and no attempt
#: to connect has failed yet.
NOT_CONNECTED_YET = "not connected yet: no attempt to connect has ended"


def readiness(hub: HubView) -> Readiness:
    """
    Check whether C{hub} is ready now.
    """
    domains: dict[str, dict[str, Any]] = {}
    for name, runtime in hub.domains.items():
        bus = runtime.bus
        connected = bool(getattr(bus, "connected", False))
        detail: dict[str, Any] = {
            "ready": connected,
            "connected": connected,
            "transport": "memory" if runtime.config.is_memory else "amqp",
        }
        blocked = getattr(bus, "blocked", None)
        if isinstance(blocked, bool):
            detail["blocked"] = blocked
        error = getattr(bus, "last_error", None)
        detail["error"] = (
            escape_control(str(error) or type(error).__name__, 300)
            if isinstance(error, BaseException)
            else None
        )
        if not connected and detail["error"] is None and not runtime.config.is_memory:
            # Nothing failed yet: the first attempt (to a broker that may
            # hang) has not ended.
            detail["error"] = NOT_CONNECTED_YET
        # The broker refusing publishes: a 403 (they go to the failed area)
        # or a missing exchange (they wait in the outbox).
        refused = getattr(bus, "publish_refused", None)
        if isinstance(refused, str):
            detail["publish_refused"] = escape_control(refused, 300)
            detail["ready"] = False
        # An outbox that can not open or write refuses every hand-over;
        # one that can not read its backlog back publishes none of it.
        problem = getattr(runtime.publisher, "problem", None)
        detail["outbox_error"] = None if problem is None else escape_control(str(problem), 300)
        if problem is not None:
            detail["ready"] = False
        domains[name] = detail
    consumers: dict[str, dict[str, Any]] = {}
    for name, service in hub.consumers.items():
        consuming = bool(service.consuming)
        halted = bool(service.halted)
        start_error = getattr(service, "problem", None)
        domain = service.component.domain
        if start_error is not None:
            why: str | None = escape_control(str(start_error), 300)
        elif not consuming and not halted and not domains.get(domain, {}).get("connected", True):
            why = f"domain {domain} is not connected"
        else:
            why = None
        consumers[name] = {
            "ready": consuming and not halted,
            "domain": domain,
            "consuming": consuming,
            "halted": halted,
            "error": why,
        }
    producers: dict[str, dict[str, Any]] = {}
    for name, producer in hub.producers.items():
        failure = producer_failure(hub, producer)
        # One whose start failed, even after marking itself running (its
        # startService raised, its listener could not bind), is not.
        running = bool(producer.running) and failure is None
        producers[name] = {
            "ready": failure is None,
            "running": running,
            "error": None if failure is None else escape_control(failure, 300),
        }
    ready = all(
        detail["ready"] for group in (domains, consumers, producers) for detail in group.values()
    )
    return Readiness(ready, domains, consumers, producers)


@dataclass(frozen=True)
class Activity:
    """
    One outcome the monitor observed.

    @ivar time: When (the clock's seconds).
    @ivar domain: The domain it happened in.
    @ivar source: C{"outbox"} or the consumer's name.
    @ivar outcome: For the outbox C{"confirmed"}, C{"returned"}, C{"nacked"} or
        C{"rejected"}; for a consumer the L{Settled} outcome.
    @ivar msg_id: The message id.
    @ivar message: The message, when known (the outbox tells only the id).
    @ivar reason: Why, for outcomes other than success.
    """

    time: float
    domain: str
    source: str
    outcome: str
    msg_id: str
    message: Message | None = None
    reason: str | None = None


class ConsumerNotes:
    """
    What the monitor remembers about one consumer.

    @ivar handled: Handler calls finished (and their deliveries settled).
    @ivar total_time: Seconds those calls took, added up.
    @ivar last_message: When a delivery was last settled, or C{None}.
    @ivar last_trouble: When, what and why of the last delivery that was not
        acknowledged, or C{None}.
    """

    def __init__(self) -> None:
        self.handled = 0
        self.total_time = 0.0
        self.last_message: float | None = None
        self.last_trouble: tuple[float, str, str] | None = None


class _Observable(Protocol):
    def add_observer(self, observer: Callable[[str, str], object]) -> None: ...

    def remove_observer(self, observer: Callable[[str, str], object]) -> None: ...


class HubMonitor:
    """
    Watches one hub: gathers what its components do not count, tells
    listeners what happens, and exports everything through L{registry}.

    Nothing is touched before L{attach}; L{detach} undoes what can be undone.

    @ivar hub: The hub watched.
    @ivar registry: The Prometheus registry of this hub alone.
    @ivar consumers: L{ConsumerNotes} by consumer name (once attached).
    @ivar last_consumed: By domain, when a consumer last settled a delivery.
    @ivar last_confirmed: By domain, when the broker last confirmed a message.
    """

    log = HubLogger()

    def __init__(
        self,
        hub: HubView,
        clock: IReactorTime,
        *,
        buckets: Iterable[float] = HANDLING_BUCKETS,
    ) -> None:
        self.hub = hub
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self._handling = Histogram(
            "fedhub_consumer_handling_seconds",
            "Time from handing a delivery to the handler until its result is known",
            ["consumer"],
            registry=self.registry,
            buckets=tuple(buckets),
        )
        self.registry.register(_HubCollector(self))
        self.consumers: dict[str, ConsumerNotes] = {}
        self.last_consumed: dict[str, float] = {}
        self.last_confirmed: dict[str, float] = {}
        self._listeners: list[Callable[[Activity], object]] = []
        self._attached = False
        # Consumer services keep their observers for good: remember which
        # already have ours, so attaching again does not double them.
        self._observing: set[int] = set()
        self._outbox_observers: list[tuple[_Observable, Callable[[str, str], object]]] = []

    # --- wiring ------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """
        Whether the monitor is watching.
        """
        return self._attached

    def attach(self) -> None:
        """
        Start watching: observe every outbox and consumer.  Calling it again
        does nothing.
        """
        if self._attached:
            return
        self._attached = True
        for name, runtime in self.hub.domains.items():
            publisher = runtime.publisher
            if callable(getattr(publisher, "add_observer", None)):
                observable = cast(_Observable, publisher)
                observer = self._outbox_observer(name)
                observable.add_observer(observer)
                self._outbox_observers.append((observable, observer))
        for name, service in self.hub.consumers.items():
            self.consumers.setdefault(name, ConsumerNotes())
            if id(service) not in self._observing:
                self._observing.add(id(service))
                service.add_observer(self._consumer_observer(name, service))

    def detach(self) -> None:
        """
        Stop watching: remove the outbox observers.  Consumer services can
        not drop an observer; ours ignore what they hear until L{attach} is
        called again.
        """
        if not self._attached:
            return
        self._attached = False
        for observable, observer in self._outbox_observers:
            try:
                observable.remove_observer(observer)
            except ValueError:
                pass
        self._outbox_observers = []

    def add_listener(self, listener: Callable[[Activity], object]) -> None:
        """
        Call C{listener} with an L{Activity} for every outcome observed while
        attached.  It runs in the reactor thread and must be quick; what it
        raises is logged and ignored.
        """
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Activity], object]) -> None:
        """
        Stop calling a listener added with L{add_listener}.
        """
        self._listeners.remove(listener)

    def _outbox_observer(self, domain: str) -> Callable[[str, str], object]:
        def observed(event: str, message_id: str, message: Message | None = None) -> None:
            # A third argument is taken when an outbox passes the message.
            if not self._attached:
                return
            now = self.clock.seconds()
            if event == "confirmed":
                self.last_confirmed[domain] = now
            self._tell(Activity(now, domain, "outbox", event, message_id, message))

        return observed

    def _consumer_observer(self, name: str, service: ConsumerService) -> Callable[[Settled], None]:
        domain = service.component.domain
        observe_handling = self._handling.labels(consumer=name).observe

        def observed(settled: Settled) -> None:
            if not self._attached:
                return
            now = self.clock.seconds()
            notes = self.consumers.setdefault(name, ConsumerNotes())
            if settled.handling is not None:
                notes.handled += 1
                notes.total_time += settled.handling
                observe_handling(settled.handling)
            notes.last_message = now
            self.last_consumed[domain] = now
            if settled.outcome in TROUBLE:
                notes.last_trouble = (now, settled.outcome, settled.reason or "")
            message = settled.message
            self._tell(Activity(now, domain, name, settled.outcome, message.id, message, settled.reason))

        return observed

    def _tell(self, activity: Activity) -> None:
        for listener in list(self._listeners):
            try:
                listener(activity)
            except Exception:
                self.log.failure(
                    "Status listener {listener!r} failed on {msg_id}",
                    listener=listener,
                    msg_id=activity.msg_id,
                    domain=activity.domain,
                )

    # --- exposition ----------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """
        The metrics in the format an C{Accept} header asks for (Prometheus
        text by default, or OpenMetrics).

        @return: the body and its content type.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


# --- the collector ---------------------------------------------------------------


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class _Families:
    """
    Metric families made on first use, yielded in the order made.
    """

    def __init__(self) -> None:
        self._made: dict[str, Metric] = {}

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        made = self._made.get(name)
        if made is None:
            made = self._made[name] = _counter(name, doc, labels)
        return cast(CounterMetricFamily, made)

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        made = self._made.get(name)
        if made is None:
            made = self._made[name] = _gauge(name, doc, labels)
        return cast(GaugeMetricFamily, made)

    def __iter__(self) -> Iterator[Metric]:
        return iter(list(self._made.values()))


class _HubCollector:
    """
    Reads the hub's live numbers at scrape time.  One component that fails to
    report is logged and left out; the scrape goes on.
    """

    log = HubLogger()

    def __init__(self, monitor: HubMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterable[Metric]:
        monitor = self._monitor
        hub = monitor.hub
        now = monitor.clock.seconds()
        families = _Families()
        try:
            ready: bool | None = readiness(hub).ready
        except Exception:
            ready = None
            self.log.failure("Checking whether the hub is ready failed")
        for name, runtime in hub.domains.items():
            try:
                self._domain(families, name, runtime, now)
            except Exception:
                self.log.failure("Reading the numbers of domain {domain} failed", domain=name)
        for name, service in hub.consumers.items():
            try:
                self._consumer(families, name, service)
            except Exception:
                self.log.failure("Reading the numbers of consumer {consumer} failed", consumer=name)
        for name, producer in hub.producers.items():
            try:
                self._producer(families, name, producer, now, producer_failure(hub, producer) is None)
            except Exception:
                self.log.failure("Reading the numbers of producer {producer} failed", producer=name)
        if ready is not None:
            families.gauge(
                "fedhub_ready", "1 when /ready answers 200: every domain connected with a usable outbox, "
                "every consumer consuming, every producer started", []
            ).add_metric([], 1.0 if ready else 0.0)
        return families

    def _domain(self, families: _Families, name: str, runtime: DomainRuntime, now: float) -> None:
        monitor = self._monitor
        labels = [name]
        bus = runtime.bus
        connected = bool(getattr(bus, "connected", False))
        families.gauge("fedhub_bus_connected", "1 while the domain's bus takes messages", ["domain"]).add_metric(
            labels, 1.0 if connected else 0.0
        )
        blocked = getattr(bus, "blocked", None)
        if isinstance(blocked, bool):
            families.gauge(
                "fedhub_bus_blocked", "1 while the broker blocks publishing (a resource alarm)", ["domain"]
            ).add_metric(labels, 1.0 if blocked else 0.0)
        bus_stats = getattr(bus, "stats", None)
        connections = getattr(bus_stats, "connections", 0)
        families.counter(
            "fedhub_bus_reconnects", "Times the bus connected again after its first connection", ["domain"]
        ).add_metric(labels, float(max(0, int(connections) - 1)))
        undecodable = getattr(bus_stats, "undecodable", None)
        if isinstance(undecodable, int):
            families.counter(
                "fedhub_bus_undecodable",
                "Deliveries rejected as no valid message (body not JSON, a bad topic or header), "
                "before any consumer saw them",
                ["domain"],
            ).add_metric(labels, float(undecodable))
        stats_method = getattr(runtime.publisher, "stats", None)
        if callable(stats_method):
            stats = stats_method()
            if isinstance(stats, OutboxStats):
                self._outbox(families, labels, stats)
        direction = families.gauge(
            "fedhub_last_message_age_seconds",
            "Seconds since the domain last had a message confirmed (published) or settled by a consumer (consumed)",
            ["domain", "direction"],
        )
        for kind, seen in (("published", monitor.last_confirmed), ("consumed", monitor.last_consumed)):
            when = seen.get(name)
            if when is not None:
                direction.add_metric([name, kind], max(0.0, now - when))

    @staticmethod
    def _outbox(families: _Families, labels: list[str], stats: OutboxStats) -> None:
        for counter, doc in (
            ("accepted", "Messages handed to the outbox and written to disk"),
            ("published", "Messages given to the bus, resends included"),
            ("confirmed", "Messages the broker confirmed"),
            ("returned", "Messages the broker returned as unroutable"),
            ("nacked", "Messages the broker refused"),
            ("rejected", "Messages the bus refused as invalid"),
        ):
            families.counter(f"fedhub_outbox_{counter}", doc, ["domain"]).add_metric(
                labels, float(getattr(stats, counter))
            )
        families.gauge(
            "fedhub_outbox_depth_messages", "Messages in the outbox waiting for their confirm", ["domain"]
        ).add_metric(labels, float(stats.depth))
        families.gauge("fedhub_outbox_depth_bytes", "Stored size of the waiting messages", ["domain"]).add_metric(
            labels, float(stats.depth_bytes)
        )
        families.gauge(
            "fedhub_outbox_in_flight_messages", "Messages published and not yet confirmed", ["domain"]
        ).add_metric(labels, float(stats.in_flight))
        families.gauge(
            "fedhub_outbox_failed_messages", "Messages in the failed area, waiting for an operator", ["domain"]
        ).add_metric(labels, float(stats.failed))
        families.gauge(
            "fedhub_outbox_oldest_age_seconds",
            "Age of the oldest waiting message (0 when none waits)",
            ["domain"],
        ).add_metric(labels, float(stats.oldest_age or 0.0))
        families.gauge(
            "fedhub_outbox_paused", "1 while sending waits for the bus", ["domain"]
        ).add_metric(labels, 1.0 if stats.paused else 0.0)

    def _consumer(self, families: _Families, name: str, service: ConsumerService) -> None:
        labels = [name, service.component.domain]
        label_names = ["consumer", "domain"]
        for key, value in service.stats.items():
            if not _NAME.match(key):
                continue
            doc = _CONSUMER_COUNTERS.get(key, f"Deliveries counted as {key}")
            families.counter(f"fedhub_consumer_{key}", doc, label_names).add_metric(labels, float(value))
        families.gauge(
            "fedhub_consumer_in_flight", "Deliveries the handler is working on", label_names
        ).add_metric(labels, float(service.in_flight))
        families.gauge(
            "fedhub_consumer_waiting",
            "Deliveries held for the handler until a call in progress ends",
            label_names,
        ).add_metric(labels, float(service.waiting))
        families.gauge(
            "fedhub_consumer_consuming", "1 while the consumer consumes from its queue", label_names
        ).add_metric(labels, 1.0 if service.consuming else 0.0)
        families.gauge(
            "fedhub_consumer_halted", "1 once a Halt verdict stopped the consumer", label_names
        ).add_metric(labels, 1.0 if service.halted else 0.0)
        blocking = families.counter(
            "fedhub_consumer_blocking_calls",
            "Calls into the plugin that held the event loop longer than its blocking_warning",
            [*label_names, "call"],
        )
        for call, count in service.blocking.counts.items():
            blocking.add_metric([*labels, call], float(count))

    def _producer(
        self, families: _Families, name: str, producer: IService, now: float, started: bool
    ) -> None:
        labels = [name]
        families.gauge("fedhub_producer_running", "1 while the producer runs", ["producer"]).add_metric(
            labels, 1.0 if started and getattr(producer, "running", False) else 0.0
        )
        status = getattr(producer, "status", None)
        if callable(status):
            self._poller(families, labels, status(), producer, now)
        counters = getattr(producer, "counters", None)
        if isinstance(counters, Mapping):
            self._smtp(families, name, counters)
        pool = getattr(producer, "pool", None)
        if pool is not None and isinstance(getattr(pool, "counters", None), Mapping):
            self._parse_pool(families, name, pool)

    @staticmethod
    def _parse_pool(families: _Families, name: str, pool: Any) -> None:
        """
        The parse workers of an SMTP listener (a
        L{fedhub.producers.bugzilla.workers.ParserPool}).
        """
        labels = [name]
        for metric, doc, value in (
            ("fedhub_smtp_parse_workers", "Parse worker processes configured", pool.workers),
            ("fedhub_smtp_parse_workers_ready", "Parse workers running and ready", pool.ready_workers),
            ("fedhub_smtp_parse_queued", "Mails waiting for a parse worker", pool.queued),
        ):
            families.gauge(metric, doc, ["producer"]).add_metric(labels, float(value))
        events = families.counter(
            "fedhub_smtp_parse_events",
            "Parse worker events: mails parsed and refused, busy refusals, timeouts, crashes, restarts",
            ["producer", "event"],
        )
        for key, value in sorted(pool.counters.items()):
            if isinstance(key, str) and _NAME.match(key):
                events.add_metric([name, key], float(value))

    @staticmethod
    def _poller(
        families: _Families, labels: list[str], status: Any, producer: object, now: float
    ) -> None:
        if not isinstance(status, Mapping):
            return
        for key, doc in (
            ("polls", "Polls that succeeded"),
            ("errors", "Polls that failed"),
            ("published", "Messages the poller handed over"),
            ("dropped", "Messages the publisher refused for good"),
        ):
            value = status.get(key)
            if isinstance(value, (int, float)):
                families.counter(f"fedhub_poller_{key}", doc, ["producer"]).add_metric(labels, float(value))
        errors = status.get("consecutive_errors")
        if isinstance(errors, (int, float)):
            families.gauge(
                "fedhub_poller_consecutive_errors", "Polls failed in a row", ["producer"]
            ).add_metric(labels, float(errors))
        lag = status.get("lag")
        if isinstance(lag, (int, float)):
            families.gauge(
                "fedhub_poller_lag_seconds", "How far the cursor is behind the source", ["producer"]
            ).add_metric(labels, float(lag))
        last_success = getattr(producer, "last_success", None)
        if isinstance(last_success, (int, float)):
            families.gauge(
                "fedhub_poller_last_success_age_seconds", "Seconds since the last successful poll", ["producer"]
            ).add_metric(labels, max(0.0, now - float(last_success)))

    @staticmethod
    def _smtp(families: _Families, name: str, counters: Mapping[str, int]) -> None:
        accepted = families.counter(
            "fedhub_smtp_mails_accepted", "Mails answered 250, by outcome", ["producer", "outcome"]
        )
        for outcome in _SMTP_ACCEPTED:
            accepted.add_metric([name, outcome], float(counters.get(f"mails_{outcome}", 0)))
        refused = families.counter(
            "fedhub_smtp_mails_refused", "Mails refused, by reason", ["producer", "reason"]
        )
        connections_refused = families.counter(
            "fedhub_smtp_connections_refused", "Connections refused, by reason", ["producer", "reason"]
        )
        events = families.counter(
            "fedhub_smtp_events", "Other SMTP listener events, by name", ["producer", "event"]
        )
        families.counter("fedhub_smtp_connections", "Connections accepted", ["producer"]).add_metric(
            [name], float(counters.get("connections", 0))
        )
        for key, value in sorted(counters.items()):
            if not isinstance(key, str) or not _NAME.match(key):
                continue
            if key.startswith("mails_refused_"):
                refused.add_metric([name, key[len("mails_refused_"):]], float(value))
            elif key.startswith("connections_refused_"):
                connections_refused.add_metric([name, key[len("connections_refused_"):]], float(value))
            elif key == "connections" or key in {f"mails_{o}" for o in _SMTP_ACCEPTED}:
                continue
            else:
                events.add_metric([name, key], float(value))
