"""
The hub: the service tree that wires domains, producers and consumers.

For every security domain the hub builds a bus (the in-process bus or an AMQP
connection) and an outbox that publishes through it.  Consumers and producers
are built by their plugins and get their own domain's publisher only.

Services start in order (buses, outboxes, spool importers, consumers,
producers, the status server); a service whose start fails is logged and
the others run.  They stop in the reverse order, one kind after the other
(the services of one kind together), so producers stop taking work first,
consumers drain before the outboxes stop, and outboxes are flushed before
their connection goes.  A service whose stop does not finish within
L{STOP_TIMEOUT} (a consumer: plus twice its C{drain_timeout} and
L{CANCEL_TIMEOUT}) is logged and the kinds after it stop without it, so the
process still exits.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from fedhub.config import ComponentConfig, Config, DomainConfig
from fedhub.errors import ConfigError, ConfigProblem
from fedhub.consumers.runner import CANCEL_TIMEOUT, ConsumerService
from fedhub.interfaces import IBus, IConsumerPlugin, IProducerPlugin, IPublisher
from fedhub.logs import HubLogger
from fedhub.outbox import Outbox
from fedhub.outbox.spool import SpoolImporter, spool_directory
from fedhub.plugins import PluginContext, find_consumer_plugin, find_plugin, find_producer_plugin
from fedhub.text import escape_control
from fedhub.topology import OverlapSearch, Topology
from fedhub.waiting import with_timeout


#: Seconds the hub waits for one of its services to stop before it logs the
#: service by name and goes on stopping the kinds after it, so that a stop
#: that never finishes cannot keep the process from exiting.  It is longer
#: than the bounds the built-in services set on their own stops (an outbox's
#: C{stop_timeout}, an AMQP bus's C{confirm_timeout}, a poller's
#: C{stop_timeout}).  A consumer gets twice its C{drain_timeout} and
#: L{CANCEL_TIMEOUT} on top: its messages in hand and its plugin's C{stop()}
#: may each take C{drain_timeout}, and between the two it may wait that long
#: for its bus to confirm that nothing more is delivered.
STOP_TIMEOUT: Final = 60.0


class _StopTooLong(Exception):
    """
    A service did not stop within its L{stop_timeout}.
    """


def stop_timeout(service: IService) -> float:
    """
    How long L{SequentialMultiService} waits for C{service} to stop (see
    L{STOP_TIMEOUT}).
    """
    if isinstance(service, ConsumerService):
        return STOP_TIMEOUT + 2 * service.drain_timeout + CANCEL_TIMEOUT
    return STOP_TIMEOUT


class SequentialMultiService(MultiService):
    """
    A C{MultiService} that starts its children in order, containing a child
    whose start fails, and stops them in stages, last added first.

    Consecutive children whose names share the part before a colon (all the
    C{consumer:...}, all the C{outbox:...}) form one stage: they stop at the
    same time, and the stage before them stops only once every one of them
    has stopped.  A child without such a name is a stage of its own.  So
    the time a stop takes is the longest drain of each kind, not the sum
    of every component's.

    With a clock, a child whose stop has not finished after
    L{stop_timeout} is logged by name and counts as stopped: the stages
    before it stop all the same.

    @ivar clock: Times the bound on each child's stop; C{None} waits for
        every child however long its stop takes.
    @ivar start_failures: Why the children whose start failed did (the
        exception, as text), by service name.
    """

    log = HubLogger()

    def __init__(self, clock: IReactorTime | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.start_failures: dict[str, str] = {}

    def startService(self) -> None:
        Service.startService(self)
        self.start_failures.clear()
        for service in self:
            self._start_child(service)

    def _start_child(self, service: IService) -> None:
        """
        Start one child.  A child that raises, or returns a Deferred that
        fails, is logged by name and the others start all the same: one
        component's failure never keeps the rest of the hub from running.
        """

        def failed(failure: Failure | None = None) -> None:
            error = (failure or Failure()).value
            self.start_failures[service.name] = f"{type(error).__name__}: {error}"
            self.log.failure(
                "Starting {service} failed; the hub runs without it", failure,
                service=service.name, **_component_fields(service.name),
            )

        try:
            started = service.startService()
        except Exception:
            failed()
            return
        if isinstance(started, Deferred):
            started.addErrback(failed)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        Service.stopService(self)
        for stage in reversed(_stages(list(self))):
            yield DeferredList([self._stop_child(service) for service in reversed(stage)])

    def _stop_child(self, service: IService) -> Deferred[None]:
        """
        Stop one child.  The result fires once its stop finished or failed
        (the failure logged), or, with a clock, once its L{stop_timeout}
        passed; the child's own Deferred is left alone then, not cancelled.
        """
        fields = _component_fields(service.name)

        def failed(failure: Failure) -> None:
            self.log.failure(
                "Stopping {service} failed", failure, service=service.name, **fields
            )

        stopped: Deferred[None] = maybeDeferred(service.stopService)
        stopped.addErrback(failed)
        if self.clock is None:
            return stopped
        timeout = stop_timeout(service)

        def gave_up(failure: Failure) -> None:
            failure.trap(_StopTooLong)
            self.log.error(
                "{service} did not stop within {timeout} s; stopping the rest of the hub "
                "without it",
                service=service.name, timeout=timeout, **fields,
            )

        return with_timeout(stopped, timeout, self.clock, _StopTooLong).addErrback(gave_up)


def _stage_key(service: IService) -> str | None:
    name = service.name
    if isinstance(name, str) and ":" in name:
        return name.partition(":")[0]
    return None


def _stages(services: list[IService]) -> list[list[IService]]:
    """
    Group consecutive services of one kind (see L{SequentialMultiService}).
    """
    stages: list[list[IService]] = []
    for service in services:
        key = _stage_key(service)
        if stages and key is not None and _stage_key(stages[-1][0]) == key:
            stages[-1].append(service)
        else:
            stages.append([service])
    return stages


def _component_fields(name: object) -> dict[str, Any]:
    """
    The stable log field (C{consumer} or C{producer}) naming the component
    behind a service name such as C{producer:mail}.
    """
    if isinstance(name, str):
        kind, _, component = name.partition(":")
        if kind in ("consumer", "producer") and component:
            return {kind: component}
    return {}


class TopologyService(Service):
    """
    Declares a domain's configured topology when the hub starts (the bus
    declares it again after every reconnect).
    """

    log = HubLogger()

    def __init__(self, bus: IBus, topology: Topology) -> None:
        self.bus = bus
        self.topology = topology

    def startService(self) -> None:
        super().startService()
        self.bus.declare(self.topology).addErrback(
            lambda f: self.log.failure(
                "Declaring the topology of domain {domain} failed", f, domain=self.bus.domain
            )
        )


@dataclass
class DomainRuntime:
    """
    What the hub runs for one security domain.

    @ivar config: The domain's configuration.
    @ivar bus: Its transport.
    @ivar publisher: Its outbox: the only way components publish.
    """

    config: DomainConfig
    bus: IBus
    publisher: IPublisher


def make_bus(domain: DomainConfig, reactor: Any) -> IBus:
    """
    Build the transport a domain's configuration asks for.
    """
    if domain.is_memory:
        from fedhub.bus.memory import MemoryBus

        return MemoryBus(domain.name, exchange=domain.exchange, clock=reactor)
    from fedhub.amqp.transport import AMQPBus

    bus: IBus = AMQPBus.from_domain(domain, reactor)
    return bus


def start_problems(config: Config) -> list[ConfigProblem]:
    """
    What the hub would refuse when it starts, beyond the file itself: the
    state directory's length (L{state_problems}), each domain's connection
    settings and TLS files (L{domain_problems}), and the files each
    component reads when it starts (L{file_problems}).  C{twistd fedhub}
    and C{fedhub check-config} ask before anything starts.  Components of a
    domain C{config} lacks (the valid part of a file with problems) are
    left out.
    """
    problems = state_problems(config)
    for domain in config.domains.values():
        problems.extend(domain_problems(domain))
    for component in config.components:
        if component.domain in config.domains:
            plugin = find_plugin(component.kind, component.plugin)
            problems.extend(file_problems(component, plugin))
    return problems


def state_problems(config: Config) -> list[ConfigProblem]:
    """
    What the state directory's length would refuse: each domain's outbox
    is a SQLite database under it, and SQLite opens no path longer than
    L{fedhub.outbox.store.MAX_DATABASE_PATH} bytes.  C{fedhub check-config}
    and C{twistd fedhub} ask before anything starts.
    """
    from fedhub.outbox.store import DATABASE_NAME, MAX_DATABASE_PATH

    problems = []
    for name in config.domains:
        path = os.path.join(config.hub.state_dir, "outbox", name, DATABASE_NAME)
        size = len(os.fsencode(path))
        if size > MAX_DATABASE_PATH:
            problems.append(ConfigProblem(
                "hub.state_dir",
                f"too long: the outbox of domain {escape_control(name, 100)} would be a path of "
                f"{size} bytes, and SQLite opens at most {MAX_DATABASE_PATH}",
            ))
    return problems


def directory_problem(path: str) -> str | None:
    """
    Why the directory C{path} could not be used, or made, by this user; or
    C{None}.  C{fedhub check-config} asks it of the state directory, which
    the hub locks (and makes) when it starts, and refuses to start without.
    """
    shown = escape_control(path, 300)
    existing = path
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if os.path.islink(existing) and not os.path.exists(existing):
        target = escape_control(repr(os.readlink(existing)), 300)
        return f"{escape_control(existing, 300)} is a symbolic link to {target}, which does not exist"
    if not os.path.isdir(existing):
        if existing == path:
            return f"{shown} is not a directory"
        return f"{escape_control(existing, 300)} is not a directory, so {shown} can not be made"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = (
            "written" if existing == path
            else f"made ({escape_control(existing, 300)} can not be written)"
        )
        return f"{shown} can not be {what} by this user (uid {os.getuid()})"
    return None


def domain_problems(domain: DomainConfig) -> list[ConfigProblem]:
    """
    What a domain's bus would refuse when it is built (its broker URL and
    settings, as L{fedhub.amqp.transport.AMQPBus.from_domain} reads them:
    whitespace in the URL, say), then its TLS files (L{tls_problems}).
    C{fedhub check-config} and C{twistd fedhub} ask before anything starts.
    """
    if domain.is_memory:
        return []
    from twisted.internet.task import Clock

    try:
        make_bus(domain, Clock())
    except ConfigError as e:
        return [replace(problem, message=escape_control(problem.message, 500))
                for problem in e.problems]
    return tls_problems(domain)


def certificate_warnings(config: Config) -> list[str]:
    """
    Warnings about the domains' client certificates: expired, or ending
    soon (see L{fedhub.amqp.tls.expiry_warning}), and a private key every
    user can read (L{fedhub.amqp.tls.exposed_key_warning}).  C{fedhub
    check-config} prints them and the hub logs them when it starts; they
    refuse nothing (a renewed certificate is read at the next connection).
    """
    from fedhub.amqp.tls import expiry_warning, exposed_key_warning

    warnings = []
    for domain in config.domains.values():
        if domain.tls and domain.cert:
            warning = expiry_warning(domain.cert)
            if warning is not None:
                warnings.append(f"domains.{domain.name}.cert: {warning}")
            warning = exposed_key_warning(domain.cert, domain.key)
            if warning is not None:
                where = "key" if domain.key else "cert"
                warnings.append(f"domains.{domain.name}.{where}: {warning}")
    return warnings


#: Steps L{bridge_warnings} may take in all (see
#: L{fedhub.topology.OverlapSearch}): a few tenths of a second at most.
BRIDGE_CHECK_LIMIT = 250_000


def bridge_warnings(config: Config) -> list[str]:
    """
    Warnings about bridges that forward the same messages: two C{bridge}
    consumers from one domain to another whose queues both get a topic
    (their C{topics}, or their C{allow} patterns) that both C{allow}
    forward it each, so the target domain gets it twice.  C{fedhub
    check-config} prints them and the hub logs them when it starts.  The
    search is bounded (L{BRIDGE_CHECK_LIMIT}): past it, a warning says
    what was not checked.
    """
    search = OverlapSearch(BRIDGE_CHECK_LIMIT)
    bridges = [c for c in config.consumers if c.kind == "consumer" and c.plugin == "bridge"]
    # What each bridge forwards: its allow patterns, each with a topic
    # pattern it meets when the consumer has topics of its own.
    forwards: dict[str, list[tuple[str, ...]]] = {}
    for bridge in bridges:
        allow = tuple(bridge.options.get("allow") or ())
        if not bridge.topics:
            forwards[bridge.path] = [(pattern,) for pattern in allow]
        else:
            forwards[bridge.path] = [
                pair for pair in itertools.product(bridge.topics, allow)
                if search.find(*pair) is not None
            ]
    warnings = []
    for first, second in itertools.combinations(bridges, 2):
        target = first.options.get("to_domain")
        if first.domain != second.domain or target != second.options.get("to_domain"):
            continue
        example = next(
            (found for one, other in itertools.product(forwards[first.path], forwards[second.path])
             if (found := search.find(*one, *other)) is not None),
            None,
        )
        if example is not None:
            warnings.append(
                f"{first.path} and {second.path} both forward messages such as {example!r} "
                f"from domain {first.domain!r} to {target!r}: the target gets each of them "
                "twice; give each topic to one bridge"
            )
    if search.exhausted:
        warnings.append(
            "the bridges' topic patterns are too many or too intricate to check them all for "
            "bridges that forward the same messages"
        )
    return warnings


def tls_problems(domain: DomainConfig) -> list[ConfigProblem]:
    """
    Read a TLS domain's CA bundle, client certificate and key the way its
    bus does when it starts, and report what it would refuse: a file that
    holds no certificate, an encrypted key, a key of another certificate.
    C{fedhub check-config} and C{twistd fedhub} ask before anything starts,
    so such a file is a configuration problem naming the domain's key, not
    a failure of the running hub.
    """
    if not domain.tls:
        return []
    from fedhub.amqp.tls import client_tls_options, in_domain

    try:
        client_tls_options(
            domain.server_hostname or domain.host or "", domain.ca, domain.cert, domain.key
        )
    except ConfigError as e:
        return in_domain(domain.name, e)
    return []


def file_problems(component: ComponentConfig, plugin: Any) -> list[ConfigProblem]:
    """
    Ask a component's plugin what it would refuse, when the component starts,
    of the files it reads then (its optional C{file_problems(options)},
    returning C{(option, what is wrong)} pairs: a TLS certificate that is
    none, an empty secret).  C{fedhub check-config} and C{twistd fedhub}
    ask before anything starts, as they do L{tls_problems}: such a file
    stops the hub from starting instead of leaving it running without the
    component.
    """
    check = getattr(plugin, "file_problems", None)
    if check is None:
        return []
    try:
        found = list(check(component.options))
    except Exception as e:
        return [build_refusal(component, e)]
    return [
        ConfigProblem(f"{component.path}.{key}", escape_control(str(message), 500))
        for key, message in found
    ]


def build_refusal(component: ComponentConfig, error: Exception) -> ConfigProblem:
    """
    The configuration problem of a component its plugin refused to build
    with something other than a L{ConfigError}.
    """
    text = escape_control(f"{type(error).__name__}: {error}", 300)
    return ConfigProblem(component.path, f"plugin {component.plugin!r} refused it: {text}")


def built_problem(component: ComponentConfig, built: object) -> ConfigProblem | None:
    """
    The configuration problem of a component whose plugin's C{build}
    returned something the hub can not run: a consumer's handler needs
    callable C{handle}, C{start} and C{stop}, and C{topics} when the
    configuration gives none; a producer must be (or adapt to) an
    C{IService}.  C{None} when it can run.
    """
    what = type(built).__name__
    refused = f"plugin {component.plugin!r} built a {what}, "
    if component.kind == "producer":
        if IService(built, None) is None:
            return ConfigProblem(component.path, refused + "not a Twisted service (IService)")
        return None
    missing = [
        name for name in ("handle", "start", "stop") if not callable(getattr(built, name, None))
    ]
    if missing:
        return ConfigProblem(
            component.path,
            refused + f"not a message handler: it has no callable {', '.join(missing)}",
        )
    if not component.topics:
        topics = getattr(built, "topics", None)
        if (
            isinstance(topics, (str, bytes))
            or not isinstance(topics, Iterable)
            or not tuple(topics)
            or not all(isinstance(t, str) and t for t in topics)
        ):
            found = (
                "missing" if topics is None
                else f"not a list of topic patterns ({escape_control(repr(topics), 100)})"
            )
            return ConfigProblem(
                component.path,
                f"no topics: the configuration gives none and the handler's topics are {found}",
            )
    return None


class Hub(SequentialMultiService):
    """
    The whole hub built from a L{Config}.

    @ivar domains: The runtime of every domain, by name.
    @ivar consumers: The consumer services, by component name.
    @ivar producers: The producer services, by component name.
    """

    log = HubLogger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        bus_factory: Callable[[DomainConfig, Any], IBus] = make_bus,
        find_consumer: Callable[[str], IConsumerPlugin] = find_consumer_plugin,
        find_producer: Callable[[str], IProducerPlugin] = find_producer_plugin,
    ) -> None:
        super().__init__(clock=reactor)
        self.config = config
        self.reactor = reactor
        self.domains: dict[str, DomainRuntime] = {}
        self.consumers: dict[str, ConsumerService] = {}
        self.producers: dict[str, IService] = {}
        self._find_consumer = find_consumer
        self._find_producer = find_producer

        outboxes = []
        for name, domain in config.domains.items():
            bus = bus_factory(domain, reactor)
            IService(bus).setName(f"bus:{name}")
            IService(bus).setServiceParent(self)
            outbox = Outbox(
                name,
                os.path.join(config.hub.state_dir, "outbox", name),
                bus,
                reactor,
                **_outbox_settings(domain),
            )
            outbox.setName(f"outbox:{name}")
            outboxes.append(outbox)
            self.domains[name] = DomainRuntime(domain, bus, outbox)
        for name, runtime in self.domains.items():
            if runtime.config.topology != Topology():
                declarer = TopologyService(runtime.bus, runtime.config.topology)
                declarer.setName(f"topology:{name}")
                declarer.setServiceParent(self)
        for outbox in outboxes:
            outbox.setServiceParent(self)
        for name, runtime in self.domains.items():
            importer = SpoolImporter(
                name,
                spool_directory(config.hub.state_dir, name),
                runtime.publisher,
                reactor,
                failed_area=runtime.publisher,
            )
            importer.setName(f"spool:{name}")
            importer.setServiceParent(self)
        for component in config.consumers:
            self._add_consumer(component)
        for component in config.producers:
            self._add_producer(component)
        self.status: IService | None = None
        if config.hub.status:
            # Imported here: the status package reads the hub's structure.
            from fedhub.status import StatusService

            self.status = StatusService(self, config.hub.status, reactor)
            self.status.setName("status")
            self.status.setServiceParent(self)

    def _context(self, component: ComponentConfig, plugin: object) -> PluginContext:
        peers: dict[str, IPublisher] = {}
        if getattr(plugin, "crosses_domains", False) is True:
            peers = {
                name: runtime.publisher
                for name, runtime in self.domains.items()
                if name != component.domain
            }
        return PluginContext(
            name=component.name,
            domain=component.domain,
            options=component.options,
            publisher=self.domains[component.domain].publisher,
            reactor=self.reactor,
            hub=self.config.hub,
            component=component,
            peer_publishers=peers,
        )

    def _build(self, component: ComponentConfig, plugin: Any) -> Any:
        """
        Build a component with its plugin.

        @raise ConfigError: naming the component, when its plugin refuses to
            build it (with any exception: plugins check their options here).
        """
        try:
            built = plugin.build(self._context(component, plugin))
        except ConfigError as e:
            raise ConfigError(e.problems, self.config.source) from None
        except Exception as e:
            raise ConfigError([build_refusal(component, e)], self.config.source) from e
        problem = built_problem(component, built)
        if problem is not None:
            raise ConfigError([problem], self.config.source)
        return built

    def _add_consumer(self, component: ComponentConfig) -> None:
        plugin = self._find_consumer(component.plugin)
        handler = self._build(component, plugin)
        runtime = self.domains[component.domain]
        service = ConsumerService(component, handler, runtime.bus, self.reactor)
        service.setName(f"consumer:{component.name}")
        service.setServiceParent(self)
        self.consumers[component.name] = service

    def _add_producer(self, component: ComponentConfig) -> None:
        plugin = self._find_producer(component.plugin)
        service = IService(self._build(component, plugin))
        service.setName(f"producer:{component.name}")
        service.setServiceParent(self)
        self.producers[component.name] = service

    def reopen_files(self) -> None:
        """
        Reopen the files components write (after log rotation): every
        consumer handler and producer with a C{reopen()} method.
        """
        targets: list[tuple[str, object]] = [
            *((f"consumer {name}", service.handler) for name, service in self.consumers.items()),
            *((f"producer {name}", service) for name, service in self.producers.items()),
        ]
        for component, target in targets:
            reopen = getattr(target, "reopen", None)
            if callable(reopen):
                try:
                    reopen()
                except Exception:
                    # An error, not critical: its next write tries again.
                    self.log.failure("Reopening files of {component} failed", component=component,
                                     level=LogLevel.error)



def _outbox_settings(domain: DomainConfig) -> dict[str, Any]:
    """
    The outbox keyword arguments a domain's configuration sets.
    """
    return {
        "window": domain.confirm_window,
        "max_messages": domain.outbox_max_messages,
        "max_bytes": domain.outbox_max_bytes,
    }
