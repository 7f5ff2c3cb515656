"""
Finding consumer and producer plugins, and what they are built with.

Plugins are found as C{twisted.plugin.getPlugins} finds them, in the
C{twisted.plugins} package, once per process: fedhub's own live in C{twisted/plugins/fedhub_builtins.py}, and any
installed distribution can add more with a module under its own
C{twisted/plugins/} directory (see C{docs/configuration.md}, "Writing a
plugin").  Such a module holds objects that provide
C{twisted.plugin.IPlugin} and L{IConsumerPlugin} or L{IProducerPlugin}.

Plugin names are unique per kind.  When two plugins of one kind have the same
name, a warning is logged and the one from the module that sorts first by
name is kept, so the choice does not depend on directory order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from twisted.logger import ILogObserver, globalLogPublisher
from twisted.plugin import getCache
from zope.interface import implementer

from fedhub.config import ComponentConfig, HubSettings, is_valid_name
from fedhub.errors import UnknownPlugin
from fedhub.interfaces import IConsumerPlugin, IProducerPlugin, IPublisher
from fedhub.logs import HubLogger
from fedhub.text import escape_control

__all__ = [
    "PluginContext",
    "consumer_plugins",
    "producer_plugins",
    "plugins_of_kind",
    "broken_modules",
    "find_consumer_plugin",
    "find_producer_plugin",
    "find_plugin",
]

_P = TypeVar("_P")

#: The plugin interface of each kind of component.
KINDS: dict[str, Any] = {"consumer": IConsumerPlugin, "producer": IProducerPlugin}


@dataclass(frozen=True)
class PluginContext:
    """
    Everything a plugin's C{build} gets.

    @ivar name: The component's name (unique in the configuration).
    @ivar domain: The name of the component's domain.
    @ivar options: The plugin's own keys from the configuration, checked and
        with defaults applied.
    @ivar publisher: Where to publish, for this component's domain only.
    @ivar reactor: The reactor (a parameter, so tests can pass a fake clock).
    @ivar hub: The hub-wide settings.
    @ivar component: The component's whole configuration, when it came from
        one.
    @ivar peer_publishers: The publishers of the other domains, by name.  Only
        a plugin whose class sets C{crosses_domains = True} (a bridge) gets
        them; every other plugin gets an empty mapping, so nothing it builds
        can reach beyond its own domain.
    """

    name: str
    domain: str
    options: Mapping[str, Any]
    publisher: IPublisher
    reactor: Any
    hub: HubSettings
    component: ComponentConfig | None = None
    peer_publishers: Mapping[str, IPublisher] = field(default_factory=dict)

    def topic(self, suffix: str) -> str:
        """
        A full topic for this hub: C{<prefix>.<environment>.<suffix>}.
        """
        return self.hub.topic(suffix)

    @property
    def state_dir(self) -> str:
        """
        The component's own directory, C{<state_dir>/components/<name>}.
        It is not created here; the plugin creates it when it needs it.

        @raise ValueError: when the name is not a safe directory name (a
            validated configuration never has such a name).
        """
        if not is_valid_name(self.name):
            raise ValueError(f"component name {self.name!r} can not name a directory")
        return os.path.join(self.hub.state_dir, "components", self.name)


#: Plugin discovery logs here (there is no object to hang it on).
log = HubLogger()


def _origin(plugin: object, package: str) -> str:
    """
    The name of the plugin module (under C{package}) that holds C{plugin};
    C{getPlugins} imported it, so it is in C{sys.modules}.
    """
    prefix = package + "."
    for name in sorted(n for n in list(sys.modules) if n.startswith(prefix)):
        module = sys.modules.get(name)
        if module is not None and any(v is plugin for v in vars(module).values()):
            return name
    return "?"


def collect(kind: str, found: Iterable[tuple[str, _P]]) -> dict[str, _P]:
    """
    Index plugins by name: the first of each name in module order is kept;
    later ones, and plugins without a usable name, are logged and skipped.

    @param kind: C{"consumer"} or C{"producer"}, for log messages.
    @param found: C{(module name, plugin)} pairs.
    """
    result: dict[str, _P] = {}
    origins: dict[str, str] = {}
    for module, plugin in sorted(found, key=lambda pair: pair[0]):
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            log.warn(
                "Ignoring a {kind} plugin in {module} without a name: {plugin!r}",
                kind=kind,
                module=module,
                plugin=plugin,
            )
            continue
        if name in result:
            log.warn(
                "Two {kind} plugins are named {plugin_name!r}: using the one from "
                "{module}, ignoring the one from {other_module}",
                kind=kind,
                plugin_name=name,
                module=origins[name],
                other_module=module,
            )
            continue
        result[name] = plugin
        origins[name] = module
    return result


#: What discovery found in a package, by kind, once per process: a plugin
#: module that can not be imported is tried (and its traceback logged) once,
#: not at every lookup.
_found: WeakKeyDictionary[ModuleType, dict[str, dict[str, Any]]] = WeakKeyDictionary()
#: The plugin modules of a package that could not be imported, found with
#: its plugins.
_broken: WeakKeyDictionary[ModuleType, list[str]] = WeakKeyDictionary()


def _package(package: ModuleType | None) -> ModuleType:
    if package is None:
        import twisted.plugins

        package = twisted.plugins
    if package not in _found:
        _found[package], _broken[package] = _discover_all(package)
    return package


def _discover(kind: str, interface: Any, package: ModuleType | None) -> dict[str, Any]:
    return dict(_found[_package(package)][kind])


def broken_modules(package: ModuleType | None = None) -> list[str]:
    """
    The plugin modules that could not be imported, and so whose plugins are
    missing, each as C{"<file>: <error>"} (the file when it can be told):
    what discovery logs as a warning, for a program or a test that has no
    log observer.

    @param package: Where to look; the default is C{twisted.plugins}.
    """
    return list(_broken[_package(package)])


def _plugin_file(failure: Any, package: ModuleType) -> str | None:
    """
    The plugin module a failure of C{getCache}'s import came from: the first
    frame of its traceback in a directory of C{package}, else the file a
    C{SyntaxError} names (a module that does not parse has no frame).
    """
    directories = {os.path.abspath(d) for d in getattr(package, "__path__", ())}
    for frame in getattr(failure, "frames", None) or ():
        filename = str(frame[1])
        if os.path.dirname(os.path.abspath(filename)) in directories:
            return filename
    value = getattr(failure, "value", None)
    if isinstance(value, SyntaxError) and value.filename:
        return str(value.filename)
    return None


def _discover_all(package: ModuleType) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """
    The plugins of every kind in C{package}, as C{getPlugins} finds them,
    and the modules that could not be imported (see L{broken_modules}),
    which are skipped with a warning.

    @raise KeyboardInterrupt: Ctrl-C while a plugin module was imported
        (C{getCache} logs whatever an import raises, and goes on: an
        interrupt must still interrupt).
    """
    interrupted: list[BaseException] = []
    broken: list[str] = []

    @implementer(ILogObserver)
    def watch(event: dict[str, Any]) -> None:
        # getCache logs with the legacy log.err: the failure is "failure".
        failure = event.get("log_failure") or event.get("failure")
        value = getattr(failure, "value", None)
        if isinstance(value, (KeyboardInterrupt, SystemExit)):
            interrupted.append(value)
        elif isinstance(value, BaseException):
            where = _plugin_file(failure, package)
            error = f"{type(value).__name__}: {value}"
            broken.append(error if where is None else f"{where}: {error}")

    by_kind: dict[str, list[tuple[str, Any]]] = {kind: [] for kind in KINDS}
    globalLogPublisher.addObserver(watch)
    try:
        for dropin in getCache(package).values():
            for cached in dropin.plugins:
                for kind, interface in KINDS.items():
                    try:
                        plugin = interface(cached, None)
                    except Exception as e:
                        # Cached from an earlier import, broken since.
                        broken.append(f"{type(e).__name__}: {e}")
                        break
                    if plugin is not None:
                        by_kind[kind].append((_origin(plugin, package.__name__), plugin))
    finally:
        globalLogPublisher.removeObserver(watch)
    if interrupted:
        raise interrupted[0]
    broken = [escape_control(error, 500) for error in broken]
    for error in broken:
        log.warn(
            "A plugin module in {package} could not be imported; the plugins it holds are "
            "not available: {error}",
            package=package.__name__,
            error=error,
        )
    return {kind: collect(kind, found) for kind, found in by_kind.items()}, broken


def consumer_plugins(package: ModuleType | None = None) -> dict[str, IConsumerPlugin]:
    """
    Every installed consumer plugin, by name.

    @param package: Where to look; the default is C{twisted.plugins}.
    """
    return _discover("consumer", IConsumerPlugin, package)


def producer_plugins(package: ModuleType | None = None) -> dict[str, IProducerPlugin]:
    """
    Every installed producer plugin, by name.

    @param package: Where to look; the default is C{twisted.plugins}.
    """
    return _discover("producer", IProducerPlugin, package)


def plugins_of_kind(kind: str, package: ModuleType | None = None) -> dict[str, Any]:
    """
    Every installed plugin of one kind (C{"consumer"} or C{"producer"}), by name.

    @raise ValueError: for another kind.
    """
    if kind not in KINDS:
        raise ValueError(f"no such kind of plugin: {kind!r}")
    return _discover(kind, KINDS[kind], package)


def find_consumer_plugin(name: str, package: ModuleType | None = None) -> IConsumerPlugin:
    """
    The installed consumer plugin called C{name}.

    @raise UnknownPlugin: when there is none; it lists the installed ones.
    """
    installed = consumer_plugins(package)
    if name not in installed:
        raise UnknownPlugin("consumer", name, list(installed), broken_modules(package))
    return installed[name]


def find_producer_plugin(name: str, package: ModuleType | None = None) -> IProducerPlugin:
    """
    The installed producer plugin called C{name}.

    @raise UnknownPlugin: when there is none; it lists the installed ones.
    """
    installed = producer_plugins(package)
    if name not in installed:
        raise UnknownPlugin("producer", name, list(installed), broken_modules(package))
    return installed[name]


def find_plugin(kind: str, name: str) -> Any:
    """
    The installed plugin of a kind (C{"consumer"} or C{"producer"}) called
    C{name}: the lookup L{fedhub.config.parse_config} uses by default.

    @raise UnknownPlugin: when there is none.
    @raise ValueError: for another kind.
    """
    installed = plugins_of_kind(kind)
    if name not in installed:
        raise UnknownPlugin(kind, name, list(installed), broken_modules())
    return installed[name]
