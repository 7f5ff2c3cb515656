"""
Tests for L{fedhub.plugins}: the plugin context, indexing by name, and
discovery through C{twisted.plugin} of plugins shipped by other packages.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import ILogObserver, Logger, LogEvent, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub import plugins
from fedhub.config import ComponentConfig, HubSettings, parse_config
from fedhub.errors import ConfigError, UnknownPlugin
from fedhub.interfaces import IPublisher
from fedhub.message import Message
from fedhub.plugins import (
    PluginContext,
    collect,
    consumer_plugins,
    find_consumer_plugin,
    find_producer_plugin,
    plugins_of_kind,
    producer_plugins,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PLUGIN_PKG = os.path.join(HERE, "data", "plugin_pkg")


@implementer(IPublisher)
class RecordingPublisher:
    """
    A publisher that keeps what it is given.
    """

    domain = "infra"

    def __init__(self) -> None:
        self.published: list[Message] = []

    def publish(self, message: Message) -> Deferred[None]:
        """
        Keep the message.
        """
        self.published.append(message)
        return succeed(None)


@implementer(ILogObserver)
class EventList:
    """
    A log observer that keeps every event.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


class Named:
    """
    A stand-in plugin with a name.
    """

    def __init__(self, name: object, tag: str = "") -> None:
        self.name = name
        self.tag = tag


def capture_log(case: SynchronousTestCase) -> list[LogEvent]:
    """
    Collect what L{fedhub.plugins} logs during one test.
    """
    observer = EventList()
    case.patch(plugins, "log", Logger(namespace="fedhub.plugins", observer=observer))
    return observer.events


class PluginContextTests(SynchronousTestCase):
    """
    What a plugin is built with.
    """

    def context(self, name: str = "bugzilla-mail") -> PluginContext:
        """
        A context for a component of the infra domain.
        """
        self.assertTrue(verifyObject(IPublisher, RecordingPublisher()))
        component = ComponentConfig(kind="producer", index=0, name=name, plugin="bugzilla-smtp",
                                    domain="infra", options={"x": 1})
        return PluginContext(
            name=name, domain="infra", options=component.options,
            publisher=RecordingPublisher(), reactor=object(),
            hub=HubSettings(environment="stg", state_dir="/srv/hub"), component=component,
        )

    def test_topic(self) -> None:
        """
        Topics are built from the hub's prefix and environment.
        """
        self.assertEqual(self.context().topic("bugzilla.bug.new"),
                         "org.fedoraproject.stg.bugzilla.bug.new")

    def test_state_dir(self) -> None:
        """
        Each component has its own directory under the hub's state directory,
        and none is created by asking.
        """
        context = self.context()
        self.assertEqual(context.state_dir, "/srv/hub/components/bugzilla-mail")
        self.assertFalse(os.path.exists("/srv/hub/components/bugzilla-mail"))
        self.assertEqual(context.component.path if context.component else None, "producers[0]")

    def test_state_dir_unsafe_name(self) -> None:
        """
        A name that would leave the state directory has no state directory.
        """
        for name in ("../etc", "a/b", ""):
            self.assertRaises(ValueError, lambda: self.context(name).state_dir)


class CollectTests(SynchronousTestCase):
    """
    Indexing discovered plugins by name.
    """

    def test_by_name(self) -> None:
        """
        Plugins are indexed by their name.
        """
        a, b = Named("a"), Named("b")
        self.assertEqual(collect("consumer", [("m.x", a), ("m.y", b)]), {"a": a, "b": b})
        self.assertEqual(capture_log(self), [])

    def test_duplicate_first_module_wins(self) -> None:
        """
        Of two plugins with one name the one from the module that sorts first
        is kept, whatever order they were found in, and a warning names both.
        """
        events = capture_log(self)
        first, second = Named("dup", "first"), Named("dup", "second")
        found = collect("consumer", [("twisted.plugins.zz_late", second),
                                     ("twisted.plugins.aa_early", first)])
        self.assertIs(found["dup"], first)
        [event] = events
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual((event["plugin_name"], event["module"], event["other_module"]),
                         ("dup", "twisted.plugins.aa_early", "twisted.plugins.zz_late"))
        self.assertEqual(formatEvent(event),
                         "Two consumer plugins are named 'dup': using the one from "
                         "twisted.plugins.aa_early, ignoring the one from twisted.plugins.zz_late")

    def test_nameless_skipped(self) -> None:
        """
        A plugin without a string name is skipped with a warning.
        """
        events = capture_log(self)
        self.assertEqual(collect("producer", [("m", Named(None)), ("n", Named(""))]), {})
        self.assertEqual([e["module"] for e in events], ["m", "n"])


PLUGIN_MODULE = '''
"""Test plugins."""
from twisted.plugin import IPlugin
from zope.interface import implementer
from zope.interface.verify import verifyObject
from fedhub.interfaces import IConsumerPlugin, IProducerPlugin


@implementer(IPlugin, {interface})
class P:
    """A plugin."""
    options = {{}}

    def __init__(self, name, description):
        self.name = name
        self.description = description

    def build(self, context):
        """Build nothing."""

{objects}
'''


class DiscoveryTests(SynchronousTestCase):
    """
    Discovery with C{getPlugins} in a package made for the test.
    """

    def setUp(self) -> None:
        """
        Make an importable package holding plugin modules.
        """
        root = os.path.abspath(self.mktemp())
        name = f"fedhub_test_plugins_{id(self)}"
        package = os.path.join(root, name)
        os.makedirs(package)
        with open(os.path.join(package, "__init__.py"), "w") as f:
            f.write('"""Plugins for one test."""\n')
        modules = {
            "b_second": ("IConsumerPlugin", 'dup = P("dup", "second")\nother = P("other", "o")'),
            "a_first": ("IConsumerPlugin", 'dup = P("dup", "first")'),
            "c_source": ("IProducerPlugin", 'source = P("source", "s")\nnot_a_plugin = 3'),
        }
        for module, (interface, objects) in modules.items():
            with open(os.path.join(package, f"{module}.py"), "w") as f:
                f.write(PLUGIN_MODULE.format(interface=interface, objects=objects))
        sys.path.insert(0, root)
        self.addCleanup(sys.path.remove, root)

        def forget() -> None:
            for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[module]

        self.addCleanup(forget)
        self.package = __import__(name)

    def test_consumers(self) -> None:
        """
        Consumer plugins are found by name; of a duplicate name the one of the
        first module in sorted order is kept, with a warning.
        """
        events = capture_log(self)
        found = consumer_plugins(self.package)
        self.assertEqual(sorted(found), ["dup", "other"])
        self.assertEqual(found["dup"].description, "first")
        self.assertEqual([(e["module"], e["other_module"]) for e in events],
                         [(f"{self.package.__name__}.a_first", f"{self.package.__name__}.b_second")])

    def test_producers(self) -> None:
        """
        Producer plugins are found apart from consumer plugins.
        """
        self.assertEqual(sorted(producer_plugins(self.package)), ["source"])
        self.assertEqual(sorted(plugins_of_kind("producer", self.package)), ["source"])
        self.assertEqual(find_producer_plugin("source", self.package).description, "s")

    def test_interrupt_while_importing(self) -> None:
        """
        Ctrl-C while a plugin module is imported interrupts the discovery
        (Twisted's getPlugins would log it and go on, and a command would
        carry on as if nothing happened); a module that fails otherwise is
        only skipped.
        """
        directory = os.path.dirname(self.package.__file__)
        with open(os.path.join(directory, "d_interrupted.py"), "w") as f:
            f.write("raise KeyboardInterrupt()\n")
        self.assertRaises(KeyboardInterrupt, consumer_plugins, self.package)
        self.flushLoggedErrors(KeyboardInterrupt)
        with open(os.path.join(directory, "d_interrupted.py"), "w") as f:
            f.write("raise ValueError('broken plugin module')\n")
        self.assertEqual(sorted(consumer_plugins(self.package)), ["dup", "other"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_broken_module_reported_once(self) -> None:
        """
        A plugin module that can not be imported is tried once per process:
        its traceback is logged once and one warning says which package's
        plugins may be missing, however many lookups follow; the other
        modules' plugins are found.
        """
        events = capture_log(self)
        directory = os.path.dirname(self.package.__file__)
        with open(os.path.join(directory, "d_broken.py"), "w") as f:
            f.write("import fedhub_no_such_module_anywhere\n")
        for _ in range(3):
            self.assertEqual(sorted(consumer_plugins(self.package)), ["dup", "other"])
            self.assertEqual(sorted(producer_plugins(self.package)), ["source"])
            self.assertEqual(find_consumer_plugin("other", self.package).description, "o")
        self.assertEqual(len(self.flushLoggedErrors(ModuleNotFoundError)), 1)
        warnings = [e for e in events if "could not be imported" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["package"], self.package.__name__)
        self.assertIn("ModuleNotFoundError: No module named 'fedhub_no_such_module_anywhere'",
                      warnings[0]["error"])

    def test_unknown_names_broken_modules(self) -> None:
        """
        The error for an unknown plugin names the plugin modules that could
        not be imported, with their files and errors, since the plugin asked
        for may be in one of them; L{plugins.broken_modules} lists them for
        a program without a log observer.
        """
        directory = os.path.dirname(self.package.__file__)
        missing = os.path.join(directory, "d_broken.py")
        with open(missing, "w") as f:
            f.write("import fedhub_no_such_module_anywhere\n")
        unparsable = os.path.join(directory, "e_unparsable.py")
        with open(unparsable, "w") as f:
            f.write("def (:\n")
        error = self.assertRaises(UnknownPlugin, find_consumer_plugin, "mine", self.package)
        self.flushLoggedErrors(ModuleNotFoundError, SyntaxError)
        self.assertEqual(error.known, ["dup", "other"])
        self.assertEqual(len(error.broken), 2)
        self.assertTrue(error.broken[0].startswith(
            f"{missing}: ModuleNotFoundError: No module named 'fedhub_no_such_module_anywhere'"))
        self.assertTrue(error.broken[1].startswith(f"{unparsable}: SyntaxError: "))
        self.assertIn("; 2 plugin module(s) could not be imported: " + error.broken[0], str(error))
        self.assertEqual(plugins.broken_modules(self.package), error.broken)
        error = self.assertRaises(UnknownPlugin, find_producer_plugin, "mine", self.package)
        self.assertEqual(len(error.broken), 2)

    def test_unknown_reported_in_configuration(self) -> None:
        """
        A configuration naming an unknown plugin reports the plugin modules
        that could not be imported with it.
        """
        self.patch(plugins, "plugins_of_kind", lambda kind: {"log": object()})
        self.patch(plugins, "broken_modules", lambda: ["/x/twisted/plugins/mine.py: ImportError: no"])
        with self.assertRaises(ConfigError) as raised:
            parse_config('[domains.d]\nbroker = "memory"\n[[consumers]]\nname = "c"\n'
                         'plugin = "mine"\ndomain = "d"\n', "hub.toml")
        self.assertEqual(
            [str(problem) for problem in raised.exception.problems],
            ['consumers[0].plugin: unknown consumer plugin "mine" (installed: "log"); 1 plugin '
             'module(s) could not be imported: /x/twisted/plugins/mine.py: ImportError: no (line 5)'])

    def test_unknown(self) -> None:
        """
        Looking up a missing plugin raises UnknownPlugin listing the installed ones.
        """
        error = self.assertRaises(UnknownPlugin, find_consumer_plugin, "source", self.package)
        self.assertEqual((error.kind, error.name, error.known), ("consumer", "source",
                                                                 ["dup", "other"]))
        self.assertEqual(error.broken, [])
        self.assertNotIn("could not be imported", str(error))
        error = self.assertRaises(UnknownPlugin, find_producer_plugin, "dup", self.package)
        self.assertEqual(error.known, ["source"])

    def test_bad_kind(self) -> None:
        """
        Only consumer and producer plugins exist.
        """
        self.assertRaises(ValueError, plugins_of_kind, "bridge", self.package)


DISCOVER = textwrap.dedent(
    """
    import json
    from twisted.logger import formatEvent, globalLogPublisher
    from zope.interface.verify import verifyObject

    warnings = []
    globalLogPublisher.addObserver(
        lambda e: warnings.append(formatEvent(e))
        if e.get("log_namespace") == "fedhub.plugins" else None)

    from fedhub.config import parse_config
    from fedhub.errors import UnknownPlugin
    from fedhub.interfaces import IConsumerPlugin, IProducerPlugin
    from fedhub.plugins import (consumer_plugins, find_consumer_plugin, find_plugin,
                                producer_plugins)

    consumers = consumer_plugins()
    producers = producer_plugins()
    try:
        find_consumer_plugin("no-such-plugin")
    except UnknownPlugin as e:
        known = e.known
    config = parse_config('''
    [domains.d]
    broker = "memory"
    [[producers]]
    name = "src"
    plugin = "test-extra-source"
    domain = "d"
    [[consumers]]
    name = "extra"
    plugin = "test-extra"
    domain = "d"
    ''')
    print(json.dumps({
        "consumers": sorted(consumers),
        "producers": sorted(producers),
        "description": consumers["test-extra"].description,
        "verified": [verifyObject(IConsumerPlugin, consumers["test-extra"]),
                     verifyObject(IProducerPlugin, producers["test-extra-source"])],
        "same": find_plugin("consumer", "test-extra") is consumers["test-extra"],
        "known": known,
        "options": dict(config.consumers[0].options),
        "producer": config.producers[0].plugin,
        "warnings": warnings,
    }))
    """
)


class ThirdPartyDiscoveryTests(SynchronousTestCase):
    """
    A package outside fedhub adds plugins with a module under its own
    C{twisted/plugins/}.  C{twisted.plugins.__path__} is computed when it is
    first imported, so discovery runs in a fresh interpreter.
    """

    def discover(self) -> dict[str, Any]:
        """
        Run discovery with the test package and the checkout on the path.
        """
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([PLUGIN_PKG, ROOT])
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        result = subprocess.run(
            [sys.executable, "-c", DISCOVER], env=env, cwd=cwd,
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
        return found

    def test_third_party(self) -> None:
        """
        The test package's consumer and producer plugins are found next to the
        built-in ones, by getPlugins, by name lookup and by the configuration's
        default lookup (which applies their option defaults); the duplicate
        name in a later module is reported and ignored.
        """
        found = self.discover()
        self.assertIn("test-extra", found["consumers"])
        self.assertIn("test-extra-source", found["producers"])
        self.assertNotIn("test-extra-source", found["consumers"])
        self.assertEqual(found["description"], "first test-extra")
        self.assertEqual(found["verified"], [True, True])
        self.assertTrue(found["same"])
        self.assertEqual(found["known"], found["consumers"])
        self.assertEqual(found["options"], {"greeting": "hello"})
        self.assertEqual(found["producer"], "test-extra-source")
        self.assertEqual(set(found["warnings"]), {
            "Two consumer plugins are named 'test-extra': using the one from "
            "twisted.plugins.fedhub_test_extra, ignoring the one from "
            "twisted.plugins.fedhub_test_extra_dup"})
