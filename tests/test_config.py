"""
Tests for L{fedhub.config}: parsing, defaults, and every validation rule with
its key path, message and line.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fedhub.config import (
    DEFAULT_CONFIG_TEXT,
    REQUIRED,
    MAX_KEY_PARTS,
    ComponentConfig,
    Config,
    DomainConfig,
    HubSettings,
    Option,
    check_topic_pattern,
    default_config,
    escape_text,
    format_path,
    load_config,
    parse_config,
    resolve_endpoint_paths,
    redact_url,
)
from fedhub.config import _LineIndex
from fedhub.errors import ConfigError, UnknownPlugin
from fedhub.interfaces import IConsumerPlugin, IProducerPlugin

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "config")

MEMORY_DOMAIN = '[domains.d]\nbroker = "memory"\n'


def _https(value: str) -> str | None:
    return None if value.startswith("https://") else "must be an https:// URL"


def _not_negative(value: int) -> str | None:
    return None if value >= 0 else "must not be negative"


@implementer(IConsumerPlugin)
class FakeConsumerPlugin:
    """
    A consumer plugin that only declares options.
    """

    description = "a fake"

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.options = options

    def build(self, context: Any) -> Any:
        """
        Never called by configuration code.
        """
        raise AssertionError("configuration must not build plugins")


@implementer(IProducerPlugin)
class FakeProducerPlugin(FakeConsumerPlugin):
    """
    A producer plugin that only declares options.
    """


CONSUMERS = {
    "log": FakeConsumerPlugin("log", {}),
    "webhook": FakeConsumerPlugin(
        "webhook",
        {
            "url": Option(str, check=_https, help="where to post"),
            "timeout": Option(float, 10.0),
            "retries": Option(int, 3, check=_not_negative),
            "headers": Option(dict, {}),
            "events": Option(list, [], items=str),
            "secret_file": Option(str, None, path=True),
            "spool_dir": Option(str, None, directory=True),
            "mode": Option((str, int), "fast"),
        },
    ),
}
PRODUCERS = {
    "bugzilla-smtp": FakeProducerPlugin(
        "bugzilla-smtp",
        {
            "recipients": Option(list, items=str),
            "listen": Option(str, "tcp:2525:interface=127.0.0.1", endpoint=True),
        },
    ),
}


def fake_lookup(kind: str, name: str) -> Any:
    """
    Find a plugin among the fakes above.
    """
    plugins: Mapping[str, Any] = CONSUMERS if kind == "consumer" else PRODUCERS
    if name not in plugins:
        raise UnknownPlugin(kind, name, list(plugins))
    return plugins[name]


def parse(text: str, **kwargs: Any) -> Config:
    """
    Parse with the fake plugins.
    """
    kwargs.setdefault("find_plugin", fake_lookup)
    return parse_config(text, **kwargs)


def write(path: str, content: bytes = b"-----BEGIN CERTIFICATE-----\n") -> str:
    """
    Create a file (and its directory) and return its path.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return path


class ProblemsMixin:
    """
    Helpers to look at the problems of an invalid configuration.
    """

    def problems(self, text: str, **kwargs: Any) -> list[tuple[str, str, int | None]]:
        """
        The (path, message, line) of every problem in C{text}.
        """
        error = self.assertRaises(ConfigError, parse, text, **kwargs)  # type: ignore[attr-defined]
        return [(p.path, p.message, p.line) for p in error.problems]

    def messages(self, text: str, **kwargs: Any) -> list[tuple[str, str]]:
        """
        The (path, message) of every problem in C{text}.
        """
        return [(path, message) for path, message, _ in self.problems(text, **kwargs)]


class ValidConfigTests(SynchronousTestCase, ProblemsMixin):
    """
    Valid configurations and the values they give.
    """

    def test_minimal(self) -> None:
        """
        A memory domain and one consumer give a config with every default filled in.
        """
        config = parse(MEMORY_DOMAIN + '[[consumers]]\nname = "log"\nplugin = "log"\ndomain = "d"\n')
        self.assertEqual(config.hub, HubSettings())
        self.assertEqual(config.hub.state_dir, "/var/lib/fedhub")
        self.assertEqual(config.hub.status, None)
        self.assertEqual(dict(config.domains), {"d": DomainConfig(name="d", broker="memory")})
        self.assertEqual(config.producers, ())
        [consumer] = config.consumers
        self.assertEqual(
            consumer,
            ComponentConfig(
                kind="consumer", index=0, name="log", plugin="log", domain="d", options={},
                topics=(), queue="fedhub.log", concurrency=1,
            ),
        )
        self.assertEqual(consumer.path, "consumers[0]")
        self.assertIsNone(config.source)

    def test_domain_defaults(self) -> None:
        """
        A domain's optional keys have their documented defaults.
        """
        domain = DomainConfig(name="d", broker="memory")
        self.assertEqual(
            (domain.exchange, domain.heartbeat, domain.confirm_window, domain.connection_timeout,
             domain.outbox_max_messages, domain.outbox_max_bytes, domain.passive_declares,
             domain.reconnect_delay, domain.reconnect_max_delay),
            ("amq.topic", 30, 1000, 10.0, 100_000, 1024**3, False, 1.0, 60.0),
        )
        self.assertTrue(domain.is_memory)
        self.assertFalse(domain.tls)
        self.assertEqual((domain.host, domain.port, domain.vhost), (None, None, "/"))

    def test_three_domains(self) -> None:
        """
        The full sample with two amqps domains (certificate files relative to the
        file) and a memory domain loads with every value as written.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = shutil.copy(os.path.join(DATA, "three-domains.toml"), base)
        for name in ("infra/ca.pem", "infra/hub.pem", "infra/hub.key", "community/ca.pem"):
            write(os.path.join(base, name))
        config = load_config(path, find_plugin=fake_lookup)

        self.assertEqual(config.source, path)
        self.assertEqual(
            config.hub,
            HubSettings("org.fedoraproject", "prod", os.path.join(base, "state"),
                        "tcp:8070:interface=127.0.0.1"),
        )
        self.assertEqual(config.hub.topic("bugzilla.bug.update"),
                         "org.fedoraproject.prod.bugzilla.bug.update")
        self.assertEqual(list(config.domains), ["infra", "community", "fas"])

        infra = config.domains["infra"]
        self.assertEqual(
            infra,
            DomainConfig(
                name="infra", broker="amqps://broker.infra.example:5671/%2Finfra",
                ca=os.path.join(base, "infra/ca.pem"), cert=os.path.join(base, "infra/hub.pem"),
                key=os.path.join(base, "infra/hub.key"), heartbeat=10,
                connection_name="fedhub infra",
            ),
        )
        self.assertEqual((infra.host, infra.port, infra.vhost, infra.tls),
                         ("broker.infra.example", 5671, "/infra", True))
        self.assertEqual((infra.username, infra.password), (None, None))

        community = config.domains["community"]
        self.assertEqual((community.host, community.port, community.vhost), (
            "broker.community.example", 5671, "community"))
        self.assertEqual((community.username, community.password), ("hub", "s3cret"))
        self.assertEqual(community.confirm_window, 200)
        self.assertIsNone(community.cert)
        self.assertTrue(config.domains["fas"].is_memory)

        [producer] = config.producers
        self.assertEqual((producer.kind, producer.name, producer.plugin, producer.domain),
                         ("producer", "bugzilla-mail", "bugzilla-smtp", "infra"))
        self.assertEqual(dict(producer.options), {
            "recipients": ["bugzilla@hub.example"], "listen": "tcp:2525:interface=127.0.0.1"})

        log, notify, accounts = config.consumers
        self.assertEqual((log.topics, log.queue, log.concurrency, log.index),
                         (("#",), "fedhub.log", 1, 0))
        self.assertEqual(notify.topics, ("org.fedoraproject.prod.bugzilla.bug.*",
                                         "org.fedoraproject.prod.buildsys.#"))
        self.assertEqual((notify.queue, notify.concurrency, notify.path),
                         ("fedhub.community.notify", 4, "consumers[1]"))
        self.assertEqual(dict(notify.options), {
            "url": "https://hooks.community.example/fedhub", "timeout": 5.0, "retries": 3,
            "headers": {}, "events": [], "secret_file": None, "spool_dir": None, "mode": "fast"})
        self.assertIsInstance(notify.options["timeout"], float)
        self.assertEqual((accounts.domain, accounts.path), ("fas", "consumers[2]"))
        self.assertEqual([c.name for c in config.components],
                         ["bugzilla-mail", "log", "notify", "accounts"])

    def test_options_read_only(self) -> None:
        """
        The plugin options of a component can not be changed.
        """
        config = parse(MEMORY_DOMAIN + '[[consumers]]\nname = "h"\nplugin = "webhook"\n'
                       'domain = "d"\nurl = "https://h/"\n')
        with self.assertRaises(TypeError):
            config.consumers[0].options["url"] = "https://elsewhere/"  # type: ignore[index]

    def test_defaults_not_shared(self) -> None:
        """
        Mutable option defaults are copied, so one component can not change another's.
        """
        text = MEMORY_DOMAIN + "".join(
            f'[[consumers]]\nname = "h{i}"\nplugin = "webhook"\ndomain = "d"\nurl = "https://h/"\n'
            for i in range(2)
        )
        first, second = parse(text).consumers
        first.options["events"].append("x")
        self.assertEqual(second.options["events"], [])
        self.assertEqual(CONSUMERS["webhook"].options["events"].default, [])

    def test_option_union_type(self) -> None:
        """
        An option with several types takes a value of any of them.
        """
        config = parse(MEMORY_DOMAIN + '[[consumers]]\nname = "h"\nplugin = "webhook"\n'
                       'domain = "d"\nurl = "https://h/"\nmode = 2\n')
        self.assertEqual(config.consumers[0].options["mode"], 2)

    def test_path_option_readable(self) -> None:
        """
        A path option naming a readable file is kept, resolved against base_dir.
        """
        base = os.path.abspath(self.mktemp())
        write(os.path.join(base, "secret"))
        config = parse(MEMORY_DOMAIN + '[[consumers]]\nname = "h"\nplugin = "webhook"\n'
                       'domain = "d"\nurl = "https://h/"\nsecret_file = "secret"\n', base_dir=base)
        self.assertEqual(config.consumers[0].options["secret_file"], os.path.join(base, "secret"))

    def test_endpoint_paths(self) -> None:
        """
        Relative paths in endpoint strings ([hub] status, an endpoint option)
        are resolved against base_dir, escaped as endpoint strings need;
        other parameters, absolute paths and other endpoint types are kept.
        """
        base = os.path.abspath(os.path.join(self.mktemp(), "conf:dir"))
        os.makedirs(base)
        escaped = base.replace(":", "\\:")
        config = parse('[hub]\nstatus = "unix:run/status.sock:mode=600"\n' + MEMORY_DOMAIN
                       + '[[producers]]\nname = "m"\nplugin = "bugzilla-smtp"\ndomain = "d"\n'
                       'recipients = ["a@b.example"]\nlisten = "unix:address=smtp.sock"\n', base_dir=base)
        self.assertEqual(config.hub.status, f"unix:{escaped}/run/status.sock:mode=600")
        self.assertEqual(config.producers[0].options["listen"], f"unix:address={escaped}/smtp.sock")
        from twisted.internet.endpoints import _parse

        self.assertEqual(_parse(config.hub.status), (["unix", f"{base}/run/status.sock"], {"mode": "600"}))
        for given, expected in (
            ("ssl:8443:privateKey=k.pem:certKey=c\\:1.pem:interface=::1",
             f"ssl:8443:privateKey={escaped}/k.pem:certKey={escaped}/c\\:1.pem:interface=::1"),
            ("ssl:8443:privateKey=/etc/k.pem:extraCertChain=chain.pem",
             f"ssl:8443:privateKey=/etc/k.pem:extraCertChain={escaped}/chain.pem"),
            ("unix:/run/s.sock", "unix:/run/s.sock"),
            ("tcp:8070:interface=127.0.0.1", "tcp:8070:interface=127.0.0.1"),
            ("unix:", "unix:"),
        ):
            self.assertEqual(resolve_endpoint_paths(given, base), expected)
            self.assertEqual(resolve_endpoint_paths(given, None), given)

    def test_directory_option(self) -> None:
        """
        A directory option is resolved against base_dir; it may not exist
        yet, but it or its nearest existing parent must be a directory that
        can be written; an empty value stays empty.
        """
        base = os.path.abspath(self.mktemp())
        write(os.path.join(base, "a-file"))
        head = MEMORY_DOMAIN + '[[consumers]]\nname = "h"\nplugin = "webhook"\ndomain = "d"\nurl = "https://h/"\n'
        for given, expected in (("q", os.path.join(base, "q")), ("new/q", os.path.join(base, "new", "q")),
                                (base, base), ("", "")):
            config = parse(head + f'spool_dir = "{given}"\n', base_dir=base)
            self.assertEqual(config.consumers[0].options["spool_dir"], expected)
        self.assertEqual(self.messages(head + 'spool_dir = "a-file"\n', base_dir=base),
                         [("consumers[0].spool_dir", f'"{base}/a-file" is not a directory')])
        self.assertEqual(
            self.messages(head + 'spool_dir = "a-file/q"\n', base_dir=base),
            [("consumers[0].spool_dir",
              f'can not create "{base}/a-file/q": "{base}/a-file" is not a directory')])
        if os.getuid() != 0:
            locked = os.path.join(base, "locked")
            os.mkdir(locked, 0o500)
            self.assertEqual(self.messages(head + 'spool_dir = "locked/q"\n', base_dir=base),
                             [("consumers[0].spool_dir", f'can not write in "{locked}": permission denied')])

    def test_keys_checked_together(self) -> None:
        """
        A plugin's check_options sees its checked keys together and its
        problems are reported at their keys, with the file's others; one
        that raises on valid keys is a problem of the component.
        """
        seen: list[dict[str, Any]] = []

        def check(options: Mapping[str, Any]) -> list[tuple[str, str]]:
            seen.append(dict(options))
            return [] if options["retries"] else [("retries", "must not be 0 without a secret_file")]

        plugin = FakeConsumerPlugin("pair", CONSUMERS["webhook"].options)
        plugin.check_options = check  # type: ignore[attr-defined]

        def lookup(kind: str, name: str) -> Any:
            return plugin if name == "pair" else fake_lookup(kind, name)

        head = MEMORY_DOMAIN + '[[consumers]]\nname = "h"\nplugin = "pair"\ndomain = "d"\nurl = "https://h/"\n'
        config = parse(head, find_plugin=lookup)
        self.assertEqual(config.consumers[0].options["retries"], 3)
        self.assertEqual(seen[-1]["retries"], 3)
        self.assertEqual(self.messages(head + "retries = 0\nbogus = 1\n", find_plugin=lookup), [
            ("consumers[0].retries", "must not be 0 without a secret_file"),
            ("consumers[0].bogus", 'unknown key for plugin "pair"'),
        ])

        def broken(options: Mapping[str, Any]) -> list[tuple[str, str]]:
            raise KeyError("x")

        plugin.check_options = broken  # type: ignore[attr-defined]
        self.assertEqual(self.messages(head, find_plugin=lookup), [
            ("consumers[0]", 'plugin "pair" could not check its keys: KeyError: \'x\''),
        ])

    def test_minimal_file(self) -> None:
        """
        The minimal sample file loads.
        """
        config = load_config(os.path.join(DATA, "minimal.toml"), find_plugin=fake_lookup)
        self.assertEqual(config.consumers[0].topics, ("#",))
        self.assertEqual(list(config.domains), ["default"])

    def test_status_endpoint(self) -> None:
        """
        A valid server endpoint string is accepted as the status endpoint.
        """
        config = parse('[hub]\nstatus = "unix:/run/fedhub/status.sock"\n' + MEMORY_DOMAIN)
        self.assertEqual(config.hub.status, "unix:/run/fedhub/status.sock")

    def test_log_level(self) -> None:
        """
        log_level defaults to info, takes the five level names and refuses others with its key path.
        """
        self.assertEqual(parse(MEMORY_DOMAIN).hub.log_level, "info")
        self.assertEqual(parse('[hub]\nlog_level = "debug"\n' + MEMORY_DOMAIN).hub.log_level, "debug")
        error = self.assertRaises(ConfigError, parse, '[hub]\nlog_level = "verbose"\n' + MEMORY_DOMAIN)
        ((key, text, line),) = [(p.path, p.message, p.line) for p in error.problems]
        self.assertEqual((key, line), ("hub.log_level", 2))
        self.assertIn("debug, info, warn, error, critical", text)

    def test_amqp_with_password(self) -> None:
        """
        A plain amqp URL with user and password is accepted (for development);
        its parts are decoded and the password is never shown.
        """
        config = parse('[domains.dev]\nbroker = "amqp://guest:gu%40st@127.0.0.1:5673/%2F"\n')
        domain = config.domains["dev"]
        self.assertEqual((domain.host, domain.port, domain.vhost, domain.tls),
                         ("127.0.0.1", 5673, "/", False))
        self.assertEqual((domain.username, domain.password), ("guest", "gu@st"))
        self.assertEqual(domain.display_broker, "amqp://guest:***@127.0.0.1:5673/%2F")
        self.assertNotIn("gu%40st", repr(domain))
        self.assertNotIn("gu%40st", repr(config))

    def test_external_auth(self) -> None:
        """
        EXTERNAL login is accepted with a client certificate.
        """
        base = os.path.abspath(self.mktemp())
        for name in ("ca", "cert", "key"):
            write(os.path.join(base, name))
        config = parse('[domains.x]\nbroker = "amqps://10.0.0.1/"\nca = "ca"\ncert = "cert"\n'
                       'key = "key"\nauth_mechanism = "EXTERNAL"\n'
                       'server_hostname = "broker.example"\n', base_dir=base)
        domain = config.domains["x"]
        self.assertEqual((domain.auth_mechanism, domain.server_hostname, domain.vhost),
                         ("EXTERNAL", "broker.example", "/"))


class DefaultConfigTests(SynchronousTestCase):
    """
    The built-in default configuration.
    """

    def test_default(self) -> None:
        """
        One memory domain "default", the Bugzilla mail listener on
        127.0.0.1:8025, one consumer "log" of every topic, state in a per-user
        temporary directory.
        """
        from fedhub.plugins import find_plugin

        config = default_config(find_plugin=find_plugin)
        self.assertEqual(list(config.domains), ["default"])
        self.assertTrue(config.domains["default"].is_memory)
        [mail] = config.producers
        self.assertEqual((mail.name, mail.plugin, mail.domain), ("bugzilla-mail", "bugzilla-smtp", "default"))
        self.assertEqual(mail.options["listen"], "tcp:8025:interface=127.0.0.1")
        self.assertEqual(list(mail.options["recipients"]), ["bugzilla@localhost"])
        self.assertEqual(config.hub.status, "tcp:8070:interface=127.0.0.1")
        [log] = config.consumers
        self.assertEqual((log.name, log.plugin, log.domain, log.topics),
                         ("log", "log", "default", ("#",)))
        self.assertEqual(os.path.dirname(config.hub.state_dir), tempfile.gettempdir())
        self.assertEqual(os.path.basename(config.hub.state_dir), f"fedhub-{os.getuid()}")
        self.assertEqual(config.hub.environment, "dev")

    def test_default_needs_log_plugin(self) -> None:
        """
        Without a "log" consumer plugin the default is refused, naming the problem.
        """
        def nothing(kind: str, name: str) -> Any:
            raise UnknownPlugin(kind, name, [])

        error = self.assertRaises(ConfigError, default_config, find_plugin=nothing)
        hint = ("none; not even fedhub's own are found, as after `pip install -e` without "
                "`--config-settings editable_mode=compat`")
        self.assertEqual([str(p) for p in error.problems],
                         ['producers[0].plugin: unknown producer plugin "bugzilla-smtp" '
                          f"(installed: {hint}) (line 9)",
                          f'consumers[0].plugin: unknown consumer plugin "log" (installed: {hint}) '
                          "(line 16)"])

    def test_default_text(self) -> None:
        """
        The default's text is itself a valid configuration.
        """
        from fedhub.plugins import find_plugin

        config = parse_config(DEFAULT_CONFIG_TEXT, find_plugin=find_plugin)
        self.assertEqual(config.consumers[0].name, "log")

    def test_hub_topic(self) -> None:
        """
        HubSettings.topic joins prefix, environment and suffix.
        """
        self.assertEqual(HubSettings(topic_prefix="org.example", environment="stg").topic("a.b"),
                         "org.example.stg.a.b")

    def test_option(self) -> None:
        """
        An Option without default is required; REQUIRED prints as its name.
        """
        self.assertTrue(Option(str).required)
        self.assertFalse(Option(str, None).required)
        self.assertEqual(repr(REQUIRED), "REQUIRED")


class SyntaxTests(SynchronousTestCase, ProblemsMixin):
    """
    Files that are not TOML, or not readable.
    """

    def test_syntax_error(self) -> None:
        """
        A TOML syntax error is one problem with tomllib's line and column.
        """
        self.assertEqual(
            self.problems('[hub]\nenvironment = "dev"\nstate_dir = \n'),
            [("toml", "invalid TOML: Invalid value (column 13)", 3)],
        )

    def test_nested_too_deeply(self) -> None:
        """
        Absurd nesting is a problem, not a RecursionError.
        """
        self.assertEqual(self.problems("a = " + "[" * 100_000),
                         [("toml", "values are nested too deeply", None)])

    def test_missing_file(self) -> None:
        """
        A file that can not be read is a ConfigError naming it.
        """
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(error.source, path)
        self.assertEqual([(p.path, p.message) for p in error.problems],
                         [("file", "can not read it: No such file or directory")])

    def test_not_utf8(self) -> None:
        """
        Bytes that are not UTF-8 are a problem naming the line.
        """
        path = write(os.path.abspath(self.mktemp()), b'[hub]\n\nenvironment = "d\xffv"\n')
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual([(p.path, p.message, p.line) for p in error.problems],
                         [("file", "not valid UTF-8 (byte 23: invalid start byte)", 3)])

    def test_byte_order_mark(self) -> None:
        """
        A file an editor started with a UTF-8 byte order mark is read as
        without it; one further on is still a problem.
        """
        text = b'[hub]\nenvironment = "dev"\n[domains.default]\nbroker = "memory"\n'
        path = write(os.path.abspath(self.mktemp()), b"\xef\xbb\xbf" + text)
        self.assertEqual(load_config(path).hub.environment, "dev")
        path = write(os.path.abspath(self.mktemp()), text + b"\xef\xbb\xbf")
        self.assertRaises(ConfigError, load_config, path)

    def test_error_text(self) -> None:
        """
        The error's text names the source, the count and every problem.
        """
        error = self.assertRaises(ConfigError, parse_config, "x = 1\n", "hub.toml",
                                  find_plugin=fake_lookup)
        self.assertEqual(str(error), "hub.toml: 2 configuration problem(s):\n"
                         "  x: unknown key (line 1)\n"
                         '  domains: at least one domain is required, such as [domains.default] '
                         'with broker = "memory"')


class KeyAndTypeTests(SynchronousTestCase, ProblemsMixin):
    """
    Unknown keys, wrong types and missing keys at every level.
    """

    def test_unknown_keys(self) -> None:
        """
        Unknown keys are reported at the top, in [hub], in a domain and in a
        component, with a suggestion when one is close.
        """
        text = (
            "verbose = true\n"
            '[hub]\nenviroment = "dev"\n'
            '[domains.d]\nbroker = "memory"\nheartbeats = 5\n'
            '[[consumers]]\nname = "h"\nplugin = "webhook"\ndomain = "d"\nurl = "https://h/"\n'
            "timout = 3\ncolour = 1\n"
        )
        self.assertEqual(self.problems(text), [
            ("verbose", "unknown key", 1),
            ("hub.enviroment", 'unknown key (did you mean "environment"?)', 3),
            ("domains.d.heartbeats", 'unknown key (did you mean "heartbeat"?)', 6),
            ("consumers[0].timout", 'unknown key for plugin "webhook" (did you mean "timeout"?)',
             12),
            ("consumers[0].colour", 'unknown key for plugin "webhook"', 13),
        ])

    def test_wrong_types(self) -> None:
        """
        Values of the wrong type name the expected and the actual type; a
        boolean is not an integer, and a float is not an integer.
        """
        text = (
            "[hub]\nenvironment = 3\n"
            '[domains.d]\nbroker = "memory"\nheartbeat = "30"\npassive_declares = "yes"\n'
            'confirm_window = 10.0\n'
            '[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "d"\nconcurrency = true\n'
            'topics = "a.b"\n'
        )
        self.assertEqual(self.messages(text), [
            ("hub.environment", "expected a string, not an integer"),
            ("domains.d.heartbeat", "expected an integer, not a string"),
            ("domains.d.passive_declares", "expected a boolean, not a string"),
            ("domains.d.confirm_window", "expected an integer, not a number"),
            ("consumers[0].concurrency", "expected an integer, not a boolean"),
            ("consumers[0].topics", "expected an array, not a string"),
        ])

    def test_max_deliveries(self) -> None:
        """
        A consumer's max_deliveries is 10 by default, 0 (no limit) to 1000 when given.
        """
        consumer = '[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "d"\n'
        self.assertEqual(parse(MEMORY_DOMAIN + consumer).consumers[0].max_deliveries, 10)
        for value in (0, 1, 1000):
            config = parse(MEMORY_DOMAIN + consumer + f"max_deliveries = {value}\n")
            self.assertEqual(config.consumers[0].max_deliveries, value)
        for value in (-1, 1001):
            self.assertEqual(
                self.messages(MEMORY_DOMAIN + consumer + f"max_deliveries = {value}\n"),
                [("consumers[0].max_deliveries", "must be between 0 (no limit) and 1000")],
            )

    def test_prefetch(self) -> None:
        """
        A consumer's prefetch is 0 (its own choice) by default; given, it is
        at most 65535 and at least the consumer's concurrency.
        """
        consumer = '[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "d"\n'
        self.assertEqual(parse(MEMORY_DOMAIN + consumer).consumers[0].prefetch, 0)
        for extra, value in (("prefetch = 1\n", 1), ("prefetch = 65535\n", 65535),
                             ("concurrency = 4\nprefetch = 4\n", 4),
                             ("concurrency = 4\nprefetch = 0\n", 0)):
            self.assertEqual(parse(MEMORY_DOMAIN + consumer + extra).consumers[0].prefetch, value)
        for value in (-1, 65536):
            self.assertEqual(
                self.messages(MEMORY_DOMAIN + consumer + f"prefetch = {value}\n"),
                [("consumers[0].prefetch", "must be between 0 (the consumer's choice) and 65535")],
            )
        self.assertEqual(
            self.messages(MEMORY_DOMAIN + consumer + "concurrency = 8\nprefetch = 5\n"),
            [("consumers[0].prefetch",
              "must be 0 or at least concurrency (8): a consumer handles only messages it holds")],
        )

    def test_section_types(self) -> None:
        """
        Sections of the wrong shape are reported, [consumers] included.
        """
        self.assertEqual(self.messages('hub = 3\ndomains = "memory"\n[consumers]\nname = "x"\n'), [
            ("hub", "expected a table, not an integer"),
            ("domains", "expected a table, not a string"),
            ("consumers", "expected an array of tables ([[consumers]]), not a table"),
        ])
        self.assertEqual(self.messages("producers = [1]\n" + MEMORY_DOMAIN),
                         [("producers[0]", "expected a table, not an integer")])
        self.assertEqual(self.messages("[domains]\nd = 5\n"),
                         [("domains.d", "expected a table, not an integer")])

    def test_missing_keys(self) -> None:
        """
        Missing required keys are reported at their table's header line.
        """
        self.assertEqual(self.problems("[domains.d]\nexchange = \"x\"\n\n[[producers]]\n"), [
            ("domains.d.broker", "required key is missing", 1),
            ("producers[0].name", "required key is missing", 4),
            ("producers[0].plugin", "required key is missing", 4),
            ("producers[0].domain", "required key is missing", 4),
        ])

    def test_no_domains(self) -> None:
        """
        A configuration needs at least one domain.
        """
        self.assertEqual(self.messages("[domains]\n"),
                         [("domains", "at least one domain is required")])

    def test_plugin_options(self) -> None:
        """
        A plugin's options are checked: required, type, items, check.
        """
        text = MEMORY_DOMAIN + (
            '[[consumers]]\nname = "h"\nplugin = "webhook"\ndomain = "d"\n'
            'timeout = "soon"\nretries = -1\nevents = ["a", 2, "c", false]\nheaders = []\n'
            'mode = 1.5\n'
            '[[producers]]\nname = "p"\nplugin = "bugzilla-smtp"\ndomain = "d"\n'
        )
        self.assertEqual(self.problems(text), [
            ("consumers[0].url", "required key is missing", 3),
            ("consumers[0].timeout", "expected a number, not a string", 7),
            ("consumers[0].retries", "must not be negative", 8),
            ("consumers[0].events[1]", "expected a string, not an integer", 9),
            ("consumers[0].events[3]", "expected a string, not a boolean", 9),
            ("consumers[0].headers", "expected a table, not an array", 10),
            ("consumers[0].mode", "expected a string or an integer, not a number", 11),
            ("producers[0].recipients", "required key is missing", 12),
        ])

    def test_path_option_unreadable(self) -> None:
        """
        A path option naming a missing file is a problem naming the file.
        """
        base = os.path.abspath(self.mktemp())
        text = MEMORY_DOMAIN + ('[[consumers]]\nname = "h"\nplugin = "webhook"\ndomain = "d"\n'
                                'url = "https://h/"\nsecret_file = "nope"\n')
        self.assertEqual(self.messages(text, base_dir=base), [
            ("consumers[0].secret_file",
             f'can not read "{base}/nope": No such file or directory')])

    def test_check_raises(self) -> None:
        """
        A plugin check that raises becomes a problem instead of escaping.
        """
        def explode(value: int) -> str | None:
            raise ZeroDivisionError("division by zero")

        def broken(kind: str, name: str) -> Any:
            return FakeConsumerPlugin(name, {"x": Option(int, 1, check=explode)})

        text = MEMORY_DOMAIN + '[[consumers]]\nname = "h"\nplugin = "p"\ndomain = "d"\nx = 2\n'
        self.assertEqual(self.messages(text, find_plugin=broken), [
            ("consumers[0].x", "could not be checked: ZeroDivisionError: division by zero")])

    def test_broken_plugin_options(self) -> None:
        """
        A plugin whose options are malformed or take one of fedhub's own keys
        is reported at the plugin key.
        """
        text = MEMORY_DOMAIN + '[[consumers]]\nname = "h"\nplugin = "p"\ndomain = "d"\n'
        for options, message in [
            ({"x": 3}, 'plugin "p" is broken: its option "x" is not a fedhub.config.Option'),
            ({"queue": Option(str)},
             'plugin "p" is broken: its option "queue" has the name of one of fedhub\'s own keys'),
            ([1], 'plugin "p" is broken: its options are not a mapping'),
        ]:
            def lookup(kind: str, name: str, options: Any = options) -> Any:
                return FakeConsumerPlugin(name, options)

            self.assertEqual(self.messages(text, find_plugin=lookup),
                             [("consumers[0].plugin", message)])


class ReferenceTests(SynchronousTestCase, ProblemsMixin):
    """
    References between sections: domains, plugins, names, queues.
    """

    def test_unknown_domain(self) -> None:
        """
        A component naming a domain that is not defined is reported.
        """
        text = MEMORY_DOMAIN + "".join(
            f'[[consumers]]\nname = "c{i}"\nplugin = "log"\ndomain = "{d}"\n'
            for i, d in enumerate(["d", "d", "fas"])
        )
        self.assertEqual(self.problems(text), [("consumers[2].domain", 'unknown domain "fas"', 14)])

    def test_invalid_domain_still_defined(self) -> None:
        """
        A component of a domain that is itself invalid gets no extra problem.
        """
        text = '[domains.d]\nbroker = "ftp://x"\n[[consumers]]\nname = "c"\nplugin = "log"\n' \
               'domain = "d"\n'
        self.assertEqual([path for path, _ in self.messages(text)], ["domains.d.broker"])

    def test_unknown_plugin(self) -> None:
        """
        An unknown plugin is reported with the installed plugins of its kind.
        """
        text = MEMORY_DOMAIN + (
            '[[producers]]\nname = "p"\nplugin = "log"\ndomain = "d"\nx = 1\n'
            '[[consumers]]\nname = "c"\nplugin = "irc"\ndomain = "d"\n'
        )
        self.assertEqual(self.messages(text), [
            ("producers[0].plugin", 'unknown producer plugin "log" (installed: "bugzilla-smtp")'),
            ("consumers[0].plugin", 'unknown consumer plugin "irc" (installed: "log", "webhook")'),
        ])

    def test_duplicate_names(self) -> None:
        """
        Producers and consumers share one namespace of names.
        """
        text = MEMORY_DOMAIN + (
            '[[producers]]\nname = "mail"\nplugin = "bugzilla-smtp"\ndomain = "d"\n'
            'recipients = []\n'
            '[[consumers]]\nname = "log"\nplugin = "log"\ndomain = "d"\n'
            '[[consumers]]\nname = "mail"\nplugin = "log"\ndomain = "d"\n'
            '[[consumers]]\nname = "log"\nplugin = "nope"\ndomain = "d"\n'
        )
        self.assertEqual(self.problems(text), [
            ("consumers[1].name", 'duplicate name "mail" (also producers[0])', 13),
            ("consumers[2].name", 'duplicate name "log" (also consumers[0])', 17),
            ("consumers[2].plugin", 'unknown consumer plugin "nope" (installed: "log", "webhook")',
             18),
        ])

    def test_duplicate_queue(self) -> None:
        """
        Two consumers of one domain may not consume the same queue.
        """
        text = MEMORY_DOMAIN + (
            '[[consumers]]\nname = "a"\nplugin = "log"\ndomain = "d"\n'
            '[[consumers]]\nname = "b"\nplugin = "log"\ndomain = "d"\nqueue = "fedhub.a"\n'
        )
        self.assertEqual(self.messages(text), [
            ("consumers[1].queue", 'queue "fedhub.a" is already used by consumers[0] in domain "d"')])

    def test_queue_of_another_consumer(self) -> None:
        """
        A consumer's queue may not be another's dead-letter or retry queue:
        the broker would refuse one of the two declarations.
        """
        text = MEMORY_DOMAIN + (
            '[[consumers]]\nname = "a"\nplugin = "log"\ndomain = "d"\n'
            '[[consumers]]\nname = "b"\nplugin = "log"\ndomain = "d"\nqueue = "fedhub.a.dead"\n'
            '[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "d"\nqueue = "fedhub.a.retry.2"\n'
            '[[consumers]]\nname = "e"\nplugin = "log"\ndomain = "d"\nqueue = "fedhub.x.dead"\n'
        )
        self.assertEqual(self.messages(text), [
            ("consumers[1].queue",
             'queue "fedhub.a.dead" is a queue of consumers[0] (its dead letters) in domain "d"'),
            ("consumers[2].queue",
             'queue "fedhub.a.retry.2" is a queue of consumers[0] (its retries) in domain "d"'),
        ])

    def test_topology_declares_a_consumers_own(self) -> None:
        """
        A domain's topology may declare a consumer's own queues and
        exchanges only as the hub declares them (a dead-letter exchange, to
        bind a queue to it, say): otherwise the broker would refuse one of
        the two declarations at start.  A queue past a consumer's
        max_retries, bindings to its queue, and the same names in another
        domain are none of its own.
        """
        text = (
            '[domains.d]\nbroker = "memory"\n[domains.d.topology]\n'
            'exchanges = [{ name = "fedhub.a.dead", type = "topic" }, { name = "q.return" },'
            ' { name = "q.dead", type = "fanout" }, { name = "archive", type = "fanout" }]\n'
            'queues = [{ name = "archive" }, { name = "fedhub.a" }, { name = "q.retry.2" },'
            ' { name = "q.retry.3" }, { name = "q.dead" },'
            ' { name = "fedhub.a.dead", arguments = { "x-queue-type" = "quorum" } },'
            ' { name = "q.retry.1", arguments = { "x-message-ttl" = 10000.0,'
            ' "x-dead-letter-exchange" = "q.return" } }]\n'
            'bindings = [{ queue = "fedhub.a", exchange = "archive", routing_key = "" },'
            ' { queue = "archive", exchange = "q.dead", routing_key = "" }]\n'
            '[domains.e]\nbroker = "memory"\n[domains.e.topology]\n'
            'queues = [{ name = "fedhub.a" }]\n'
            '[[consumers]]\nname = "a"\nplugin = "log"\ndomain = "d"\n'
            'queue_arguments = { "x-queue-type" = "quorum", "x-max-length" = 10 }\n'
            '[[consumers]]\nname = "b"\nplugin = "log"\ndomain = "d"\nqueue = "q"\nmax_retries = 2\n'
        )
        same = "declare it the same way or leave it out"
        from_arguments = "(its arguments come from the consumer's queue_arguments)"
        self.assertEqual(self.messages(text), [
            ("domains.d.topology.exchanges[0].name",
             'exchange "fedhub.a.dead" is the dead-letter exchange of consumers[0], which the '
             f"hub declares itself as a durable fanout exchange; {same}"),
            ("domains.d.topology.exchanges[1].name",
             'exchange "q.return" is the return exchange of consumers[1], which the hub '
             f"declares itself as a durable fanout exchange; {same}"),
            ("domains.d.topology.queues[1].name",
             'queue "fedhub.a" is the queue of consumers[0], which the hub declares itself, '
             'durable, with the arguments {"x-dead-letter-exchange": "fedhub.a.dead", '
             f'"x-max-length": 10, "x-queue-type": "quorum"}}; {same} {from_arguments}'),
            ("domains.d.topology.queues[2].name",
             'queue "q.retry.2" is retry queue 2 of consumers[1], which the hub declares '
             'itself, durable, with the arguments {"x-dead-letter-exchange": "q.return", '
             f'"x-message-ttl": 20000}}; {same} {from_arguments}'),
            # A double where the hub declares an integer: the broker refuses it.
            ("domains.d.topology.queues[6].name",
             'queue "q.retry.1" is retry queue 1 of consumers[1], which the hub declares '
             'itself, durable, with the arguments {"x-dead-letter-exchange": "q.return", '
             f'"x-message-ttl": 10000}}; {same} {from_arguments}'),
        ])

    def test_topology_classic_queue_type(self) -> None:
        """
        A consumer's own queue declared in a topology with C{x-queue-type}
        C{"classic"} where the hub declares it without a type, or the other
        way round, is declared the same way: RabbitMQ takes both as one
        classic queue.  C{"quorum"} or C{"stream"} against no type stays
        different, and so does C{"classic"} against C{"quorum"}.
        """
        text = (
            '[domains.d]\nbroker = "memory"\n[domains.d.topology]\n'
            'queues = ['
            # Classic in the topology, no type for the hub.
            '{ name = "fedhub.a", arguments = { "x-queue-type" = "classic",'
            ' "x-dead-letter-exchange" = "fedhub.a.dead" } },'
            ' { name = "fedhub.a.dead", arguments = { "x-queue-type" = "classic" } },'
            # No type in the topology, classic for the hub.
            ' { name = "q", arguments = { "x-dead-letter-exchange" = "q.dead" } },'
            ' { name = "q.dead" },'
            # Quorum or stream against no type, either way round.
            ' { name = "fedhub.c", arguments = { "x-queue-type" = "quorum",'
            ' "x-dead-letter-exchange" = "fedhub.c.dead" } },'
            ' { name = "fedhub.c.dead", arguments = { "x-queue-type" = "stream" } },'
            ' { name = "fedhub.e", arguments = { "x-dead-letter-exchange" = "fedhub.e.dead" } },'
            # Classic against quorum.
            ' { name = "fedhub.e.dead", arguments = { "x-queue-type" = "classic" } }]\n'
            '[[consumers]]\nname = "a"\nplugin = "log"\ndomain = "d"\n'
            '[[consumers]]\nname = "b"\nplugin = "log"\ndomain = "d"\nqueue = "q"\n'
            'queue_arguments = { "x-queue-type" = "classic" }\n'
            '[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "d"\n'
            '[[consumers]]\nname = "e"\nplugin = "log"\ndomain = "d"\n'
            'queue_arguments = { "x-queue-type" = "quorum" }\n'
        )
        tail = "declare it the same way or leave it out (its arguments come from the consumer's queue_arguments)"
        self.assertEqual(self.messages(text), [
            ("domains.d.topology.queues[4].name",
             'queue "fedhub.c" is the queue of consumers[2], which the hub declares itself, '
             f'durable, with the arguments {{"x-dead-letter-exchange": "fedhub.c.dead"}}; {tail}'),
            ("domains.d.topology.queues[5].name",
             'queue "fedhub.c.dead" is the dead-letter queue of consumers[2], which the hub '
             f"declares itself, durable, with the arguments {{}}; {tail}"),
            ("domains.d.topology.queues[6].name",
             'queue "fedhub.e" is the queue of consumers[3], which the hub declares itself, '
             'durable, with the arguments {"x-dead-letter-exchange": "fedhub.e.dead", '
             f'"x-queue-type": "quorum"}}; {tail}'),
            ("domains.d.topology.queues[7].name",
             'queue "fedhub.e.dead" is the dead-letter queue of consumers[3], which the hub '
             f'declares itself, durable, with the arguments {{"x-queue-type": "quorum"}}; {tail}'),
        ])

    def test_names(self) -> None:
        """
        Component and domain names must be safe as queue and directory names.
        """
        text = '[domains."in fra"]\nbroker = "memory"\n' + (
            '[[consumers]]\nname = "../etc"\nplugin = "log"\ndomain = "in fra"\n')
        self.assertEqual(self.messages(text), [
            ('domains."in fra"', "domain names may use only letters, digits, '.', '_' and '-', "
                                 "starting with a letter or digit"),
            ("consumers[0].name", "must be 1 to 100 letters, digits, '.', '_' or '-', starting "
                                  'with a letter or digit (not "../etc")'),
        ])

    def test_queue_names(self) -> None:
        """
        Queue names must be short, non-empty and not reserved by the broker.
        """
        text = MEMORY_DOMAIN + "".join(
            f'[[consumers]]\nname = "c{i}"\nplugin = "log"\ndomain = "d"\nqueue = "{q}"\n'
            for i, q in enumerate(["", "amq.mine", "q" * 256])
        )
        self.assertEqual(self.messages(text), [
            ("consumers[0].queue", "must not be empty"),
            ("consumers[1].queue", 'names starting with "amq." are reserved by the broker'),
            ("consumers[2].queue", "is 256 bytes long; at most 255 are allowed"),
        ])


class DomainTests(SynchronousTestCase, ProblemsMixin):
    """
    Broker URLs, TLS settings and heartbeats.
    """

    def domain(self, body: str) -> list[tuple[str, str]]:
        """
        The problems of one domain table with C{body}.
        """
        return self.messages("[domains.x]\n" + body)

    def test_broker_scheme(self) -> None:
        """
        Only memory, amqp and amqps brokers are accepted.
        """
        self.assertEqual(self.domain('broker = "https://broker.example/"\n'), [
            ("domains.x.broker",
             'unsupported scheme "https" in "https://broker.example/": use "memory", amqp:// or '
             "amqps://")])
        self.assertEqual(self.domain('broker = "localhost"\n'), [
            ("domains.x.broker",
             '"localhost" is not a broker: use "memory", amqp://... or amqps://...')])

    def test_broker_url_parts(self) -> None:
        """
        A broker URL needs a host and a valid port, no query, one vhost segment.
        """
        self.assertEqual(self.domain('broker = "amqp://:5672/"\n'),
                         [("domains.x.broker", '"amqp://:5672/" names no host')])
        self.assertEqual(self.domain('broker = "amqp://h:99999/"\n'), [
            ("domains.x.broker", '"amqp://h:99999/" is not a valid URL (is its port a number?)')])
        self.assertEqual(self.domain('broker = "amqp://h/?heartbeat=5"\n'), [
            ("domains.x.broker", '"amqp://h/?heartbeat=5": query parameters are not supported; '
                                 "use the domain's keys (heartbeat, connection_name, ...)")])
        self.assertEqual(self.domain('broker = "amqp://h/a/b"\n'), [
            ("domains.x.broker", '"amqp://h/a/b": the virtual host must be one path segment; '
                                 "write a slash in it as %2F")])

    def test_password_masked(self) -> None:
        """
        A password in a broker URL never appears in a problem.
        """
        for url in ["http://jdoe:hunter2@h/", "amqp://jdoe:hunter2@h:99x/",
                    "amqp://jdoe:hunter2@h/?x=1", "jdoe:hunter2@h"]:
            error = self.assertRaises(ConfigError, parse, f'[domains.x]\nbroker = "{url}"\n')
            self.assertNotIn("hunter2", str(error))
            if "://" in url:
                self.assertIn("jdoe:***@h", str(error))

    def test_redact_url(self) -> None:
        """
        redact_url hides the password only, even in URLs that do not parse.
        """
        self.assertEqual(redact_url("amqps://u:p@h:1/v"), "amqps://u:***@h:1/v")
        self.assertEqual(redact_url("amqp://u:p@ss@h/"), "amqp://u:***@h/")
        self.assertEqual(redact_url("amqp://u@h/"), "amqp://u@h/")
        self.assertEqual(redact_url("amqp://h/"), "amqp://h/")
        self.assertEqual(redact_url("memory"), "memory")
        self.assertEqual(redact_url("u:p@h"), "u:***@h")

    def test_amqps_needs_ca(self) -> None:
        """
        An amqps broker without a CA is refused: it would not verify the broker.
        """
        self.assertEqual(self.problems('[domains.x]\nbroker = "amqps://h/"\n'), [
            ("domains.x.ca", "required with an amqps broker: without a CA the broker's "
                             "certificate is not verified, and fedhub refuses to connect "
                             "unverified", 1)])

    def test_cert_and_key_together(self) -> None:
        """
        A client certificate needs its key, and a key its certificate.
        """
        base = os.path.abspath(self.mktemp())
        for name in ("ca", "cert", "key"):
            write(os.path.join(base, name))
        text = ('[domains.a]\nbroker = "amqps://h/"\nca = "ca"\ncert = "cert"\n'
                '[domains.b]\nbroker = "amqps://h/"\nca = "ca"\nkey = "key"\n')
        self.assertEqual(self.problems(text, base_dir=base), [
            ("domains.a.key", 'required when "cert" is set', 1),
            ("domains.b.cert", 'required when "key" is set', 5),
        ])

    def test_unreadable_files(self) -> None:
        """
        CA, certificate and key files that can not be read are named.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "dir"))
        write(os.path.join(base, "cert"))
        text = ('[domains.a]\nbroker = "amqps://h/"\nca = "missing.pem"\ncert = "cert"\n'
                'key = "dir"\n')
        self.assertEqual(self.problems(text, base_dir=base), [
            ("domains.a.ca", f'can not read "{base}/missing.pem": No such file or directory', 3),
            ("domains.a.key", f'can not read "{base}/dir": Is a directory', 5),
        ])

    def test_tls_keys_need_amqps(self) -> None:
        """
        TLS files on a plaintext or memory broker are refused rather than ignored.
        """
        base = os.path.abspath(self.mktemp())
        write(os.path.join(base, "ca"))
        text = ('[domains.a]\nbroker = "amqp://h/"\nca = "ca"\n'
                '[domains.b]\nbroker = "memory"\nserver_hostname = "h"\nauth_mechanism = "PLAIN"\n')
        self.assertEqual(self.messages(text, base_dir=base), [
            ("domains.a.ca", "only used with an amqps broker"),
            ("domains.b.server_hostname", "only used with an amqps broker"),
            ("domains.b.auth_mechanism", "not used with the memory broker"),
        ])

    def test_auth_mechanism(self) -> None:
        """
        The login mechanism is PLAIN or EXTERNAL, and EXTERNAL needs a certificate.
        """
        base = os.path.abspath(self.mktemp())
        write(os.path.join(base, "ca"))
        text = ('[domains.a]\nbroker = "amqps://h/"\nca = "ca"\nauth_mechanism = "EXTERNAL"\n'
                '[domains.b]\nbroker = "amqps://h/"\nca = "ca"\nauth_mechanism = "AMQPLAIN"\n')
        self.assertEqual(self.messages(text, base_dir=base), [
            ("domains.a.auth_mechanism", 'EXTERNAL needs a client certificate ("cert" and "key")'),
            ("domains.b.auth_mechanism", 'must be "PLAIN" or "EXTERNAL"'),
        ])

    def test_heartbeat(self) -> None:
        """
        A heartbeat of 0 (or less, or more than AMQP allows) is refused.
        """
        for value, message in [
            (0, "must be at least 1 second; 0 is refused (0 would turn heartbeats off and a "
                "dead broker would go unnoticed)"),
            (-5, "must be at least 1 second; -5 is refused (0 would turn heartbeats off and a "
                 "dead broker would go unnoticed)"),
            (65536, "must be at most 65535 seconds"),
        ]:
            self.assertEqual(self.domain(f'broker = "memory"\nheartbeat = {value}\n'),
                             [("domains.x.heartbeat", message)])

    def test_positive_numbers(self) -> None:
        """
        Limits and timeouts must be greater than 0.
        """
        self.assertEqual(
            self.domain('broker = "memory"\nconfirm_window = 0\nconnection_timeout = -1\n'
                        'outbox_max_bytes = 0\n'),
            [("domains.x.confirm_window", "must be greater than 0"),
             ("domains.x.connection_timeout", "must be greater than 0"),
             ("domains.x.outbox_max_bytes", "must be greater than 0")])

    def test_reconnect_delays(self) -> None:
        """
        The reconnect delays are seconds, greater than 0, at most an hour,
        and the first no longer than the longest (its default, 60, when not
        given).
        """
        self.assertEqual(
            self.domain('broker = "memory"\nreconnect_delay = 0\nreconnect_max_delay = 7200\n'),
            [("domains.x.reconnect_delay", "must be greater than 0"),
             ("domains.x.reconnect_max_delay", "is in seconds and at most 3600")])
        self.assertEqual(
            self.domain('broker = "memory"\nreconnect_delay = 5\nreconnect_max_delay = 2\n'),
            [("domains.x.reconnect_max_delay", "must be at least reconnect_delay (5)")])
        self.assertEqual(
            self.domain('broker = "memory"\nreconnect_delay = 90\n'),
            [("domains.x.reconnect_delay", "must be at most reconnect_max_delay (60, its default)")])
        config = parse('[domains.x]\nbroker = "memory"\nreconnect_delay = 0.5\n'
                       'reconnect_max_delay = 600\n')
        self.assertEqual((config.domains["x"].reconnect_delay, config.domains["x"].reconnect_max_delay),
                         (0.5, 600.0))

    def test_hub_values(self) -> None:
        """
        The topic prefix, environment and status endpoint are checked.
        """
        text = ('[hub]\ntopic_prefix = "org..example"\nenvironment = "prod.east"\n'
                'status = "tcp:eighty"\nstate_dir = ""\n' + MEMORY_DOMAIN)
        self.assertEqual(self.messages(text), [
            ("hub.topic_prefix", "must be dot-separated words, with no empty word, wildcard, "
                                 "whitespace or control character"),
            ("hub.environment", "must be one word of letters, digits, _ and - (for example dev, "
                                "stg or prod)"),
            ("hub.status", "not a valid endpoint string (ValueError: invalid literal for int() "
                           "with base 10: 'eighty')"),
            ("hub.state_dir", "must not be empty"),
        ])

    def test_status_port_range(self) -> None:
        """
        A status endpoint whose port is not 0 to 65535 is refused by the check, not at start.
        """
        for port in ("80700", "-1"):
            text = f'[hub]\nstatus = "tcp:{port}:interface=127.0.0.1"\n' + MEMORY_DOMAIN
            self.assertEqual(self.messages(text), [
                ("hub.status", f"not a valid endpoint string (port {port} is not within 0..65535)"),
            ])

    def test_numbers_must_be_finite(self) -> None:
        """
        inf and nan (and numbers too large for a float) are refused for every number key,
        fedhub's own and a plugin's, naming the key.
        """
        text = (
            '[domains.d]\nbroker = "memory"\nconnection_timeout = inf\n'
            '[[consumers]]\nname = "w"\nplugin = "webhook"\ndomain = "d"\nurl = "https://x/"\n'
            'retry_delay = 1e400\nmax_retry_delay = +inf\ndrain_timeout = nan\ntimeout = -inf\n'
        )
        self.assertEqual(self.problems(text), [
            ("domains.d.connection_timeout", "must be a finite number, not inf", 3),
            ("consumers[0].retry_delay", "must be a finite number, not inf", 9),
            ("consumers[0].max_retry_delay", "must be a finite number, not inf", 10),
            ("consumers[0].drain_timeout", "must be a finite number, not nan", 11),
            ("consumers[0].timeout", "must be a finite number, not -inf", 12),
        ])


    def test_upper_bounds(self) -> None:
        """
        A connection timeout over an hour (milliseconds meant as seconds) and a retry delay over
        a week are refused at check time, not by the broker or the hub once running.
        """
        text = (
            '[domains.d]\nbroker = "memory"\nconnection_timeout = 10000\n'
            '[[consumers]]\nname = "w"\nplugin = "log"\ndomain = "d"\n'
            'retry_delay = 604801\nmax_retry_delay = 3e8\n'
        )
        self.assertEqual(self.problems(text), [
            ("domains.d.connection_timeout", "is in seconds and at most 3600", 3),
            ("consumers[0].retry_delay", "must be at most 604800 seconds (7 days)", 8),
            ("consumers[0].max_retry_delay", "must be at most 604800 seconds (7 days)", 9),
        ])
        config = parse_config(
            '[domains.d]\nbroker = "memory"\nconnection_timeout = 3600\n'
            '[[consumers]]\nname = "w"\nplugin = "log"\ndomain = "d"\nmax_retry_delay = 604800\n'
        )
        self.assertEqual(config.domains["d"].connection_timeout, 3600.0)
        self.assertEqual(config.consumers[0].max_retry_delay, 604800.0)


class TopicTests(SynchronousTestCase, ProblemsMixin):
    """
    Consumer topic patterns.
    """

    def test_patterns(self) -> None:
        """
        Empty words, over-long patterns, glued wildcards and non-strings are
        reported per element.
        """
        long = "a." * 127 + "bc"
        text = MEMORY_DOMAIN + (
            '[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "d"\n'
            f'topics = ["a..b", ".a", "a.*", "{long}", "a.b*", 7, "", "a b"]\n'
        )
        self.assertEqual(self.messages(text), [
            ("consumers[0].topics[0]", 'empty word in topic pattern "a..b"'),
            ("consumers[0].topics[1]", 'empty word in topic pattern ".a"'),
            ("consumers[0].topics[3]", "topic pattern is 256 bytes long; at most 255 are allowed"),
            ("consumers[0].topics[4]",
             '"*" and "#" must stand alone as words in topic pattern "a.b*"'),
            ("consumers[0].topics[5]", "expected a string, not an integer"),
            ("consumers[0].topics[6]", "a topic pattern can not be empty"),
            ("consumers[0].topics[7]", 'topic pattern "a b" contains whitespace or control '
                                       "characters"),
        ])

    def test_empty_list(self) -> None:
        """
        An empty topic list is refused: the consumer would receive nothing.
        """
        text = MEMORY_DOMAIN + '[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "d"\ntopics = []\n'
        self.assertEqual(self.messages(text),
                         [("consumers[0].topics", "must name at least one topic pattern")])

    def test_valid_patterns(self) -> None:
        """
        Wildcard words and a pattern of exactly 255 bytes are valid.
        """
        for pattern in ["#", "*", "org.*.prod.#", "a." * 126 + "abc", "é.x"]:
            self.assertIsNone(check_topic_pattern(pattern), pattern)


class LineTests(SynchronousTestCase, ProblemsMixin):
    """
    Line numbers, found by scanning the text.
    """

    def test_multiline_string(self) -> None:
        """
        A multi-line string that holds lines like table headers does not
        confuse the count of [[consumers]] tables.
        """
        text = (
            MEMORY_DOMAIN
            + '\n[[consumers]]\nname = "a"\nplugin = "webhook"\ndomain = "d"\n'
            + 'url = """https://x/\n[[consumers]]\nname = "fake"\n"""\n'
            + '\n[[consumers]]\nname = "b"\nplugin = "log"\ndomain = "nowhere"\n'
        )
        self.assertEqual(self.problems(text),
                         [("consumers[1].domain", 'unknown domain "nowhere"', 16)])

    def test_multiline_array(self) -> None:
        """
        A multi-line array is skipped, and its elements get the key's line.
        """
        text = MEMORY_DOMAIN + (
            '[[consumers]]\nname = "c"\nplugin = "log"\ntopics = [\n  "a",  # ] not the end\n'
            '  "b..c",\n]\ndomain = "x"\n'
        )
        self.assertEqual(self.problems(text), [
            ("consumers[0].topics[1]", 'empty word in topic pattern "b..c"', 6),
            ("consumers[0].domain", 'unknown domain "x"', 10),
        ])

    def test_dotted_and_inline(self) -> None:
        """
        Dotted keys get their own line; keys inside an inline table get the
        table's line.
        """
        text = '[domains]\na.broker = "ftp://h"\n\nb = { broker = "memory", heartbeat = 0 }\n'
        self.assertEqual(self.problems(text), [
            ("domains.a.broker",
             'unsupported scheme "ftp" in "ftp://h": use "memory", amqp:// or amqps://', 2),
            ("domains.b.heartbeat", "must be at least 1 second; 0 is refused (0 would turn "
                                    "heartbeats off and a dead broker would go unnoticed)", 4),
        ])

    def test_quoted_keys_and_crlf(self) -> None:
        """
        Quoted table names and keys are found, with CRLF line ends too.
        """
        text = ('[domains."d"]\r\n"broker" = \'memory\'\r\n# comment\r\n'
                '[[ consumers ]]\r\nname = "c"\r\n  plugin = "log"\r\n  "domain" = "y"\r\n')
        self.assertEqual(self.problems(text), [("consumers[0].domain", 'unknown domain "y"', 7)])

    def test_file_order(self) -> None:
        """
        Problems come in file order, whatever the order of sections.
        """
        text = ('[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "zz"\n'
                '[domains.d]\nbroker = "memory"\nheartbeat = 0\n[hub]\nenvironment = "a.b"\n')
        self.assertEqual([(path, line) for path, _, line in self.problems(text)], [
            ("consumers[0].domain", 4), ("domains.d.heartbeat", 7), ("hub.environment", 9)])

    def test_long_dotted_keys(self) -> None:
        """
        Keys of more dotted parts than MAX_KEY_PARTS, as a key or a table
        name, are refused before the TOML parser reads them, naming their
        line; a key of that many parts is read, and its unknown part found
        on its line.
        """
        long_key = ".".join(["a"] * (MAX_KEY_PARTS + 1))
        for text, line in ((MEMORY_DOMAIN + long_key + " = 1\n", 3),
                           (f"[{long_key}]\n", 1)):
            self.assertEqual(self.problems(text), [
                ("toml", f"a key of {MAX_KEY_PARTS + 1} dotted parts (line {line}); "
                         f"at most {MAX_KEY_PARTS} are allowed", None)])
        text = MEMORY_DOMAIN + ".".join(["x"] * MAX_KEY_PARTS) + " = 1\n"
        self.assertEqual(self.problems(text), [("domains.d.x", "unknown key", 3)])

    def test_line_index_bounded(self) -> None:
        """
        The line index keeps a bounded number of prefixes of a deep key:
        not one per part, each a tuple as long as its depth.
        """
        index = _LineIndex(".".join(["a"] * 5000) + " = 1\n")
        self.assertLessEqual(len(index._lines), 32)
        self.assertEqual(index.line_of(("a",) * 5000), 1)
        self.assertEqual(index.deepest, (5000, 1))

    def test_subtable_of_array(self) -> None:
        """
        A sub-table of the k-th [[consumers]] is found under that consumer.
        """
        text = MEMORY_DOMAIN + (
            '[[consumers]]\nname = "a"\nplugin = "log"\ndomain = "d"\n'
            '[[consumers]]\nname = "h"\nplugin = "webhook"\ndomain = "d"\nurl = "https://h/"\n'
            '[consumers.headers]\nx = 1\n\n[consumers.extra]\ny = 2\n'
        )
        self.assertEqual(self.problems(text), [
            ("consumers[1].extra", 'unknown key for plugin "webhook"', 15)])


class SafeTextTests(SynchronousTestCase, ProblemsMixin):
    """
    Problems are safe to print.
    """

    def test_control_characters(self) -> None:
        """
        Control characters in keys and values are escaped in paths and messages.
        """
        text = MEMORY_DOMAIN + (
            '"\\u001b[2Jevil" = 1\n'
            '[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "f\\nas\\u202e"\n'
        )
        problems = self.problems(text)
        self.assertEqual(problems, [
            ('domains.d."\\x1b[2Jevil"', "unknown key", 3),
            ("consumers[0].domain", 'unknown domain "f\\x0aas\\u202e"', 7),
        ])
        for path, message, _ in problems:
            self.assertTrue((path + message).isprintable())

    def test_source_escaped(self) -> None:
        """
        The source name shown by the error is escaped too.
        """
        error = self.assertRaises(ConfigError, parse_config, "x", "a\nb.toml")
        self.assertEqual(error.source, "a\\x0ab.toml")

    def test_helpers(self) -> None:
        """
        escape_text and format_path render unprintable and odd keys visibly.
        """
        self.assertEqual(escape_text("a\tb\x00\U000e0001"), "a\\x09b\\x00\\U000e0001")
        self.assertEqual(format_path(("domains", "a b", "ca")), 'domains."a b".ca')
        self.assertEqual(format_path(("consumers", 2, "topics", 0)), "consumers[2].topics[0]")


class ManyProblemsTests(SynchronousTestCase):
    """
    One file with many problems.
    """

    def test_all_listed(self) -> None:
        """
        Every problem of the file is listed, in file order, with its line,
        and the broker password appears nowhere.
        """
        path = os.path.join(DATA, "many-problems.toml")
        error = self.assertRaises(ConfigError, load_config, path, find_plugin=fake_lookup)
        self.assertEqual(error.source, path)
        self.assertEqual([(p.path, p.message, p.line) for p in error.problems], [
            ("hub.environment", "must be one word of letters, digits, _ and - (for example dev, "
                                "stg or prod)", 3),
            ("hub.colour", "unknown key", 4),
            ("domains.infra.ca", "required with an amqps broker: without a CA the broker's "
                                 "certificate is not verified, and fedhub refuses to connect "
                                 "unverified", 6),
            ("domains.infra.key", 'required when "cert" is set', 6),
            ("domains.infra.heartbeat", "must be at least 1 second; 0 is refused (0 would turn "
                                        "heartbeats off and a dead broker would go unnoticed)", 8),
            ("domains.infra.cert",
             f'can not read "{DATA}/hub.pem": No such file or directory', 9),
            ("domains.community.broker", 'unsupported scheme "stomp" in '
             '"stomp://broker.community.example": use "memory", amqp:// or amqps://', 12),
            ("producers[0].recipients", "required key is missing", 14),
            ("consumers[0].name", 'duplicate name "mail" (also producers[0])', 20),
            ("consumers[0].topics[0]", 'empty word in topic pattern "org.fedoraproject..bug"', 23),
            ("consumers[1].domain", 'unknown domain "fas"', 28),
            ("consumers[1].url", "must be an https:// URL", 29),
            ("consumers[1].timout", 'unknown key for plugin "webhook" (did you mean "timeout"?)',
             30),
            ("consumers[2].plugin", 'unknown consumer plugin "printer" (installed: "log", '
                                    '"webhook")', 34),
            ("consumers[2].concurrency", "expected an integer, not a string", 36),
        ])
        self.assertNotIn("hunter2", str(error))
        self.assertTrue(str(error).startswith(f"{path}: 15 configuration problem(s):\n"))

