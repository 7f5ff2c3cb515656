"""
Test helpers for plugin authors, used by fedhub's own tests too.

L{ConsumerHarness} runs a consumer plugin exactly as the hub does (its
options checked as a configuration would check them, the same consumer
runner, the in-process bus) with a fake clock, feeds it messages and reports
what became of each::

    from fedhub.testing import ConsumerHarness

    class GreeterTests(SynchronousTestCase):
        def test_greets(self):
            harness = ConsumerHarness(GreeterPlugin(), {"greeting": "hi"})
            harness.start()
            settled = self.successResultOf(harness.deliver("org.example.dev.x", {"a": 1}))
            self.assertEqual(settled.outcome, "acked")
            self.assertEqual(harness.published, [])

L{RecordingPublisher} is an honest fake L{IPublisher} for producer tests: it
records what is handed over and can be told to refuse.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus
from fedhub.config import ComponentConfig, HubSettings, check_options
from fedhub.consumers.runner import ConsumerService, Settled
from fedhub.errors import FedhubError
from fedhub.interfaces import IConsumerPlugin, IMessageHandler, IPublisher
from fedhub.message import Message
from fedhub.plugins import PluginContext

__all__ = ["ConsumerHarness", "RecordingPublisher", "Settled"]


@implementer(IPublisher)
class RecordingPublisher:
    """
    A publisher that keeps every message handed over.

    @ivar published: The messages taken, in order.
    @ivar refuse_with: When set, every hand-over fails with this error (for
        example L{fedhub.errors.TemporarilyUnavailable}) and nothing is kept.
    @ivar hold: When true, hand-overs wait: their Deferreds are in
        L{waiting} for the test to fire.
    """

    def __init__(self, domain: str = "test") -> None:
        self.domain = domain
        self.published: list[Message] = []
        self.refuse_with: FedhubError | None = None
        self.hold = False
        self.waiting: list[tuple[Message, Deferred[None]]] = []

    def publish(self, message: Message) -> Deferred[None]:
        if not isinstance(message, Message):
            return fail(TypeError(f"expected a Message, not {type(message).__name__}"))
        if self.refuse_with is not None:
            return fail(self.refuse_with)
        if self.hold:
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: self.published.append(message))
            self.waiting.append((message, d))
            return d
        self.published.append(message)
        return succeed(None)


class ConsumerHarness:
    """
    Runs one consumer plugin on the in-process bus.

    @ivar clock: The clock the bus, the runner and the plugin (as its
        C{reactor}) use; a L{Clock} unless a reactor was given.
    @ivar bus: The L{MemoryBus} of the consumer's domain.
    @ivar publisher: The plugin's publisher, a L{RecordingPublisher}.
    @ivar peers: The publishers of the other domains, by name.
    @ivar handler: What the plugin built.
    @ivar service: The consumer runner.
    @ivar settled: Every L{Settled} so far, in order.
    """

    def __init__(
        self,
        plugin: IConsumerPlugin,
        options: Mapping[str, Any] | None = None,
        *,
        name: str = "test",
        domain: str = "test",
        topics: tuple[str, ...] = ("#",),
        hub: HubSettings | None = None,
        reactor: Any = None,
        concurrency: int = 1,
        prefetch: int = 0,
        retry_delay: float = 10.0,
        max_retries: int = 5,
        on_error: str = "retry",
        peer_domains: tuple[str, ...] = (),
    ) -> None:
        """
        Build the plugin's handler and its consumer.

        @param options: The plugin's own keys, checked against its
            C{options} (a L{fedhub.errors.ConfigError} names what is wrong).
        @param reactor: A real reactor for plugins that do real I/O; by
            default a L{Clock}, advanced by L{deliver} and L{advance}.
        @param concurrency: The consumer's C{concurrency}, and
            C{prefetch} its C{prefetch} (0: the consumer's choice), as in a
            configuration.
        @param peer_domains: Other domains; a plugin that sets
            C{crosses_domains = True} (a bridge) gets a L{RecordingPublisher}
            for each, found in L{peers}.
        """
        self.clock = reactor if reactor is not None else Clock()
        self.bus = MemoryBus(domain, clock=self.clock)
        self.publisher = RecordingPublisher(domain)
        self.peers = {name: RecordingPublisher(name) for name in peer_domains}
        checked = check_options(plugin.options, options or {})
        if hub is None:
            hub = HubSettings(state_dir=tempfile.mkdtemp(prefix="fedhub-harness-"))
        component = ComponentConfig(
            kind="consumer",
            index=0,
            name=name,
            plugin=plugin.name,
            domain=domain,
            options=checked,
            topics=topics,
            queue=f"fedhub.{name}",
            concurrency=concurrency,
            prefetch=prefetch,
            on_error=on_error,
            retry_delay=retry_delay,
            max_retries=max_retries,
        )
        context = PluginContext(
            name=name,
            domain=domain,
            options=checked,
            publisher=self.publisher,
            reactor=self.clock,
            hub=hub,
            component=component,
            peer_publishers=(
                dict(self.peers) if getattr(plugin, "crosses_domains", False) is True else {}
            ),
        )
        self.handler: IMessageHandler = plugin.build(context)
        self.service = ConsumerService(component, self.handler, self.bus, self.clock)
        self.settled: list[Settled] = []
        self._waiters: dict[str, list[Deferred[Settled]]] = {}
        self.service.add_observer(self._on_settled)

    @property
    def published(self) -> list[Message]:
        """
        What the plugin published through its publisher.
        """
        return self.publisher.published

    def _on_settled(self, event: Settled) -> None:
        self.settled.append(event)
        for waiter in self._waiters.pop(event.message.id, []):
            waiter.callback(event)

    def _turn(self) -> None:
        if isinstance(self.clock, Clock):
            for _ in range(10):
                self.clock.advance(0)

    def start(self) -> None:
        """
        Start the bus and the consumer (the plugin's C{start} included).
        """
        self.bus.startService()
        self.service.startService()
        self._turn()

    def stop(self) -> Deferred[None]:
        """
        Stop the consumer (draining, then the plugin's C{stop}) and the bus.
        """
        d: Deferred[Any] = self.service.stopService()
        d.addCallback(lambda _: self.bus.stopService())
        self._turn()
        return d

    def deliver(
        self, message: Message | str, body: Mapping[str, Any] | None = None, **fields: Any
    ) -> Deferred[Settled]:
        """
        Publish a message to the consumer's queue and return a Deferred that
        fires with its L{Settled} once the consumer decided its fate.

        @param message: A L{Message}, or a topic to build one from with
            C{body} and C{fields} (see L{Message.create}).
        """
        if not isinstance(message, Message):
            message = Message.create(message, body or {}, **fields)
        waiter: Deferred[Settled] = Deferred()
        self._waiters.setdefault(message.id, []).append(waiter)
        published = self.bus.publish(message)
        published.addErrback(lambda f: waiter.errback(f) if not waiter.called else None)
        self._turn()
        return waiter

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass on the fake clock (retry delays, plugin timers).
        """
        if not isinstance(self.clock, Clock):
            raise TypeError("advance() needs the harness's own Clock")
        self.clock.advance(seconds)
        self._turn()
