"""
Tests for C{fedhub check-config} and the example configurations it checks.
"""

from __future__ import annotations

import io
import re
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli.main import main
from fedhub.config import MAX_KEY_PARTS
from fedhub.outbox.store import MAX_DATABASE_PATH
from tests.broker import Authority, Key


def cert_pem(authority: Authority) -> str:
    """The PEM text of a CA's certificate."""
    return authority.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def key_pem(key: Key) -> str:
    """The PEM text of an unencrypted private key."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")

ROOT = Path(__file__).resolve().parent.parent


class CheckConfigTests(SynchronousTestCase):
    """
    The command's exit status and output.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir(parents=True)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)

    def check(self, text: str) -> int:
        path = self.directory / "hub.toml"
        path.write_text(f'[hub]\nstate_dir = "{self.directory}"\n' + text)
        return main(["check-config", str(path)])

    def test_valid(self) -> None:
        """A valid file exits 0 with a one-line summary."""
        code = self.check('[domains.a]\nbroker = "memory"\n[[consumers]]\nname = "l"\nplugin = "log"\n'
                          'domain = "a"\ntopics = ["#"]\n')
        self.assertEqual(code, 0)
        self.assertIn("OK (1 domain(s), 0 producer(s), 1 consumer(s))", self.out.getvalue())

    def test_world_readable_password_warned(self) -> None:
        """
        A valid file that holds a broker password and every user can read
        gets a warning on standard error, and still exits 0.
        """
        path = self.directory / "hub.toml"
        text = '[domains.a]\nbroker = "amqp://hub:s3cret@127.0.0.1/"\n'
        self.check(text)
        os.chmod(path, 0o644)
        self.err.truncate(0)
        self.err.seek(0)
        code = main(["check-config", str(path)])
        self.assertEqual(code, 0)
        self.assertEqual(
            self.err.getvalue(),
            f"warning: {path} holds a broker password and every user can read it (mode 0644): "
            "chmod o-r it, or keep the password out of it (a client certificate and EXTERNAL "
            "login)\n",
        )
        os.chmod(path, 0o600)
        self.err.truncate(0)
        self.err.seek(0)
        self.assertEqual(main(["check-config", str(path)]), 0)
        self.assertEqual(self.err.getvalue(), "")

    def test_every_problem(self) -> None:
        """Every problem gets its own line with key path and line; exit status 1."""
        code = self.check('bogus = 1\n[domains.a]\nbroker = "memory"\n[[consumers]]\nname = "l"\n'
                          'plugin = "log"\ndomain = "fas"\n')
        self.assertEqual(code, 1)
        lines = [line.strip() for line in self.err.getvalue().splitlines()]
        self.assertTrue(lines[0].endswith(": 2 configuration problem(s):"), lines)
        self.assertEqual(lines[1:], ["hub.bogus: unknown key (line 3)",
                                     'consumers[0].domain: unknown domain "fas" (line 9)'])

    def test_plugin_refusals_reported(self) -> None:
        """Problems only a plugin sees when built (a bridge to an unknown domain) are reported too."""
        code = self.check('[domains.a]\nbroker = "memory"\n[[consumers]]\nname = "b"\nplugin = "bridge"\n'
                          'domain = "a"\ntopics = ["#"]\nto_domain = "nowhere"\nallow = ["#"]\n')
        self.assertEqual(code, 1)
        self.assertIn("consumers[0].to_domain", self.err.getvalue())


    def test_overlapping_bridges_warned(self) -> None:
        """
        Two bridges of one domain to the same other domain that both forward
        some topic get a warning naming them and such a topic; the file is
        still valid.  Bridges whose topics can not meet, or that go to
        different domains, get none.
        """
        bridge = ('[[consumers]]\nname = "{name}"\nplugin = "bridge"\ndomain = "a"\n'
                  'to_domain = "{to}"\nallow = {allow}\n')
        head = '[domains.a]\nbroker = "memory"\n[domains.b]\nbroker = "memory"\n[domains.c]\nbroker = "memory"\n'
        code = self.check(
            head
            + bridge.format(name="one", to="b", allow='["org.example.prod.bugzilla.#"]')
            + bridge.format(name="two", to="b", allow='["org.example.*.bugzilla.bug.*"]')
            + bridge.format(name="three", to="b", allow='["org.example.prod.koji.#"]')
            + bridge.format(name="four", to="c", allow='["#"]')
        )
        self.assertEqual(code, 0)
        self.assertEqual(self.err.getvalue(), (
            "warning: consumers[0] and consumers[1] both forward messages such as "
            "'org.example.prod.bugzilla.bug.x' from domain 'a' to 'b': the target gets each of "
            "them twice; give each topic to one bridge\n"))

    def test_overlapping_bridges_check_bounded(self) -> None:
        """
        Bridges whose patterns would take long to compare are checked only
        so far, and a warning says so; the file is still valid.
        """
        bridge = ('[[consumers]]\nname = "{name}"\nplugin = "bridge"\ndomain = "a"\n'
                  'to_domain = "b"\nallow = {allow}\n')
        stars = ".".join(["*"] * 20)
        hard = lambda word, last: "[" + ", ".join(  # noqa: E731
            f'"#.{word}{n}.{stars}.{last}"' for n in range(3)) + "]"
        code = self.check(
            '[domains.a]\nbroker = "memory"\n[domains.b]\nbroker = "memory"\n'
            + bridge.format(name="one", allow=hard("a", "z"))
            + bridge.format(name="two", allow=hard("b", "y"))
        )
        self.assertEqual(code, 0)
        self.assertEqual(self.err.getvalue(), (
            "warning: the bridges' topic patterns are too many or too intricate to check them "
            "all for bridges that forward the same messages\n"))

    def test_plugin_refusal_reported_once(self) -> None:
        """Options a plugin refuses both when asked for its files and when built give one line, not two."""
        code = self.check('[domains.a]\nbroker = "memory"\n[[producers]]\nname = "m"\n'
                          'plugin = "bugzilla-smtp"\ndomain = "a"\nrecipients = ["bugs@example.org"]\n'
                          'max_recipients = 50\nmax_commands_per_mail = 20\n')
        self.assertEqual(code, 1)
        lines = [line.strip() for line in self.err.getvalue().splitlines()]
        self.assertTrue(lines[0].endswith(": 1 configuration problem(s):"), lines)
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("max_commands_per_mail must be at least max_recipients + 5 (55)", lines[1])
    def test_broker_url_the_bus_refuses(self) -> None:
        """
        A broker URL the domain's bus would refuse at start (whitespace in
        it) is reported, as the hub refuses it, with the password hidden.
        """
        code = self.check('[domains.a]\nbroker = " amqp://u:secret@127.0.0.1/"\n'
                          '[domains.b]\nbroker = "amqp://u:secret@host name/"\n')
        self.assertEqual(code, 1)
        lines = [line.strip() for line in self.err.getvalue().splitlines()]
        self.assertEqual(lines[1:], [
            "domains.a.broker: the broker URL contains whitespace or control characters (line 4)",
            "domains.b.broker: the broker URL contains whitespace or control characters (line 6)",
        ])
        self.assertNotIn("secret", self.err.getvalue())

    def test_state_dir_too_long_for_sqlite(self) -> None:
        """
        A state directory so long that a domain's outbox database would have
        a path SQLite does not open is reported (the hub refuses it too).
        """
        long = "/tmp/" + "s" * 480
        path = self.directory / "long.toml"
        path.write_text(f'[hub]\nstate_dir = "{long}"\n[domains.d]\nbroker = "memory"\n')
        self.assertEqual(main(["check-config", str(path)]), 1)
        lines = [line.strip() for line in self.err.getvalue().splitlines()]
        self.assertEqual(lines[1:], [
            "hub.state_dir: too long: the outbox of domain d would be a path of 509 bytes, "
            f"and SQLite opens at most {MAX_DATABASE_PATH} (line 2)",
        ])
        self.assertEqual(self.check('[domains.d]\nbroker = "memory"\n'), 0)

    def test_state_dir_not_a_directory(self) -> None:
        """
        A state directory that is a file, or lies under one, is reported:
        the hub could not lock it, nor make its outboxes there.
        """
        blocker = self.directory / "afile"
        blocker.write_text("")
        for state, expected in [
            (blocker, f"{blocker} is not a directory"),
            (blocker / "sub", f"{blocker} is not a directory, so {blocker / 'sub'} can not be made"),
        ]:
            self.err.truncate(0)
            self.err.seek(0)
            path = self.directory / "state.toml"
            path.write_text(f'[hub]\nstate_dir = "{state}"\n[domains.d]\nbroker = "memory"\n')
            self.assertEqual(main(["check-config", str(path)]), 1)
            lines = [line.strip() for line in self.err.getvalue().splitlines()]
            self.assertEqual(lines[1:], [f"hub.state_dir: {expected} (line 2)"])
        # One to be made in a directory that can be written is fine.
        path.write_text(f'[hub]\nstate_dir = "{self.directory / "new" / "state"}"\n'
                        '[domains.d]\nbroker = "memory"\n')
        self.assertEqual(main(["check-config", str(path)]), 0)

    def test_long_dotted_key_refused(self) -> None:
        """
        A dotted key of thousands of parts is refused before the TOML parser
        reads it (which takes memory in the square of its parts).
        """
        code = self.check('[domains.a]\nbroker = "memory"\n' + ".".join(["a"] * 15_000) + " = 1\n")
        self.assertEqual(code, 1)
        lines = [line.strip() for line in self.err.getvalue().splitlines()]
        self.assertEqual(
            lines[1:], [f"toml: a key of 15000 dotted parts (line 5); at most {MAX_KEY_PARTS} are allowed"]
        )

    def test_plugin_and_file_problems_with_other_problems(self) -> None:
        """
        A file with problems of its own still gets what the valid parts'
        plugins and files refuse, with lines: every problem in one round.
        A bridge to a domain the file defines, though wrongly, is not told
        that domain is unknown.
        """
        (self.directory / "notes.txt").write_text("placeholder\n")
        code = self.check(
            '[domains.a]\nbroker = "memory"\n'
            '[domains.b]\nbroker = "memory"\nheartbeat = 0\n'
            '[domains.t]\nbroker = "amqps://broker.example/"\nca = "notes.txt"\n'
            '[[consumers]]\nname = "x"\nplugin = "bridge"\ndomain = "a"\nconcurency = 2\n'
            'to_domain = "nowhere"\nallow = ["#"]\n'
            '[[consumers]]\nname = "y"\nplugin = "bridge"\ndomain = "a"\nto_domain = "b"\n'
            'allow = ["#"]\n'
        )
        self.assertEqual(code, 1)
        lines = [line.strip() for line in self.err.getvalue().splitlines()]
        self.assertTrue(lines[0].endswith(": 4 configuration problem(s):"), lines)
        self.assertEqual(lines[1], "domains.b.heartbeat: must be at least 1 second; 0 is refused "
                                   "(0 would turn heartbeats off and a dead broker would go "
                                   "unnoticed) (line 7)")
        self.assertTrue(lines[2].startswith("consumers[0].concurency: unknown key"), lines)
        self.assertTrue(lines[3].startswith("domains.t.ca: "), lines)
        self.assertIn("holds no PEM certificate", lines[3])
        self.assertIn("(line 10)", lines[3])
        self.assertEqual(lines[4], "consumers[0].to_domain: unknown domain 'nowhere' "
                                   "(other domains: b, t) (line 16)")

    def test_unusable_tls_files(self) -> None:
        """
        TLS files that exist but hold no certificate, or a key of another certificate, are
        problems of their domain's keys (the hub would fail on them at start).
        """
        ca = Authority.create("check-config CA")
        _, leaf = ca.issue("hub")
        other_key, _ = ca.issue("other")
        (self.directory / "ca.pem").write_text(cert_pem(ca))
        (self.directory / "hub.pem").write_text(leaf.public_bytes(serialization.Encoding.PEM).decode())
        (self.directory / "other.key").write_text(key_pem(other_key))
        (self.directory / "notes.txt").write_text("placeholder\n")
        code = self.check(
            '[domains.a]\nbroker = "amqps://broker.example/"\nca = "notes.txt"\n'
            '[domains.b]\nbroker = "amqps://broker.example/"\nca = "ca.pem"\ncert = "hub.pem"\n'
            'key = "other.key"\n'
        )
        self.assertEqual(code, 1)
        lines = [line.strip() for line in self.err.getvalue().splitlines()]
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[1].startswith("domains.a.ca: "), lines)
        self.assertIn("holds no PEM certificate", lines[1])
        self.assertTrue(lines[2].startswith("domains.b.key: "), lines)
        self.assertIn("does not match the certificate", lines[2])

    def test_tls_problems_of_one_domain_together(self) -> None:
        """A domain's unusable CA bundle and its mismatched key are reported in one round."""
        ca = Authority.create("check-config CA")
        _, leaf = ca.issue("hub")
        other_key, _ = ca.issue("other")
        (self.directory / "hub.pem").write_text(leaf.public_bytes(serialization.Encoding.PEM).decode())
        (self.directory / "other.key").write_text(key_pem(other_key))
        (self.directory / "notes.txt").write_text("placeholder\n")
        code = self.check(
            '[domains.b]\nbroker = "amqps://broker.example/"\nca = "notes.txt"\ncert = "hub.pem"\n'
            'key = "other.key"\n'
        )
        self.assertEqual(code, 1)
        lines = [line.strip() for line in self.err.getvalue().splitlines()]
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[1].startswith("domains.b.ca: "), lines)
        self.assertIn("holds no PEM certificate", lines[1])
        self.assertTrue(lines[2].startswith("domains.b.key: "), lines)
        self.assertIn("does not match the certificate", lines[2])

    def test_unusable_smtp_files(self) -> None:
        """
        The SMTP listener's certificate, key and client CA, and its secret
        file, are read as the listener reads them when it starts: one that
        holds no certificate, a key of another certificate or an empty
        secret is a problem of the producer's key.
        """
        ca = Authority.create("check-config CA")
        key, leaf = ca.issue("mail")
        other_key, _ = ca.issue("other")
        (self.directory / "leaf.pem").write_text(leaf.public_bytes(serialization.Encoding.PEM).decode())
        (self.directory / "leaf.key").write_text(key_pem(key))
        (self.directory / "other.key").write_text(key_pem(other_key))
        (self.directory / "empty").write_text("\n")
        head = ('[domains.a]\nbroker = "memory"\n[[producers]]\nname = "mail"\nplugin = "bugzilla-smtp"\n'
                'domain = "a"\nrecipients = ["bugs@hub.example"]\n')
        code = self.check(head + 'tls_certificate = "leaf.key"\n')
        self.assertEqual(code, 1)
        lines = [line.strip() for line in self.err.getvalue().splitlines()]
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[1].startswith("producers[0].tls_certificate: "), lines)
        self.assertIn("holds no PEM certificate", lines[1])
        self.err.truncate(0)
        self.err.seek(0)
        code = self.check(head + 'tls_certificate = "leaf.pem"\ntls_key = "other.key"\nsecret_file = "empty"\n')
        self.assertEqual(code, 1)
        lines = sorted(line.strip() for line in self.err.getvalue().splitlines()[1:])
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith("producers[0].secret_file: "), lines)
        self.assertTrue(lines[1].startswith("producers[0].tls_key: "), lines)
        self.err.truncate(0)
        self.err.seek(0)
        code = self.check(head + 'tls_certificate = "leaf.pem"\ntls_key = "leaf.key"\n')
        self.assertEqual(code, 0, self.err.getvalue())

    def test_unreadable_file(self) -> None:
        """A file that can not be read is not checked at all: 78 and one line, as for every command."""
        missing = str(self.directory / "nowhere.toml")
        self.assertEqual(main(["check-config", missing]), 78)
        self.assertEqual(self.err.getvalue().splitlines(),
                         [f"fedhub check-config: {missing}: can not read it: No such file or directory"])

    def check_tls_domain(self, expired: bool = False) -> int:
        """
        Check a TLS domain whose CA bundle, client certificate (expired when
        asked) and key are real files that belong together.
        """
        ca = Authority.create("check-config CA")
        key, leaf = ca.issue("hub", expired=expired)
        (self.directory / "ca.pem").write_text(cert_pem(ca))
        (self.directory / "hub.pem").write_text(leaf.public_bytes(serialization.Encoding.PEM).decode())
        (self.directory / "hub.key").write_text(key_pem(key))
        return self.check('[domains.a]\nbroker = "amqps://broker.example/"\nca = "ca.pem"\n'
                          'cert = "hub.pem"\nkey = "hub.key"\n')

    def test_usable_tls_files(self) -> None:
        """A domain with a real CA bundle and a matching client certificate and key passes."""
        code = self.check_tls_domain()
        self.assertEqual(code, 0, self.err.getvalue())

    def test_expired_client_certificate_warned(self) -> None:
        """
        An expired client certificate passes (a renewed one is read at the
        next connection) with a warning naming the domain's key: the broker
        would refuse it with a bare "certificate expired".
        """
        code = self.check_tls_domain(expired=True)
        self.assertEqual(code, 0, self.err.getvalue())
        self.assertIn("warning: domains.a.cert: the client certificate in", self.err.getvalue())
        self.assertIn("expired on", self.err.getvalue())

    def test_key_readable_by_everyone_warned(self) -> None:
        """
        A client key every user can read passes with a warning naming the
        domain's key, the file and its mode; one readable by its owner
        and group only gets none.
        """
        self.check_tls_domain()
        key = self.directory / "hub.key"
        key.chmod(0o644)
        self.err.truncate(0)
        self.err.seek(0)
        code = self.check('[domains.a]\nbroker = "amqps://broker.example/"\nca = "ca.pem"\n'
                          'cert = "hub.pem"\nkey = "hub.key"\n')
        self.assertEqual(code, 0, self.err.getvalue())
        self.assertIn(
            f"warning: domains.a.key: the private key in {str(key)!r} can be read by every user "
            "(mode 0644)",
            self.err.getvalue(),
        )
        key.chmod(0o640)
        self.err.truncate(0)
        self.err.seek(0)
        code = self.check('[domains.a]\nbroker = "amqps://broker.example/"\nca = "ca.pem"\n'
                          'cert = "hub.pem"\nkey = "hub.key"\n')
        self.assertEqual(code, 0, self.err.getvalue())
        self.assertNotIn("can be read by every user", self.err.getvalue())


class ExampleConfigTests(SynchronousTestCase):
    """
    The configurations in examples/ are valid once the files they name exist.
    """

    def materialize(self, name: str) -> Path:
        """
        Copy an example, pointing every absolute path it names at readable files in a temp dir:
        a CA certificate for C{ca.pem}, a client certificate and its key for other C{.pem} and
        C{.key} files, placeholder text for the rest.
        """
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        text = (ROOT / "examples" / name).read_text()
        ca = Authority.create("example CA")
        key, leaf = ca.issue("hub")
        contents = {
            "ca.pem": cert_pem(ca),
            ".pem": leaf.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            ".key": key_pem(key),
        }

        def replace(match: re.Match[str]) -> str:
            target = directory / match.group(1).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.suffix in (".pem", ".key", ".secret", ".token", ".txt"):
                content = contents.get(target.name, contents.get(target.suffix, "placeholder\n"))
                target.write_text(content)
            return f'"{target}"'

        text = re.sub(r'"(/(?:etc|var|srv|opt)/[^"]+)"', replace, text)
        path = directory / name
        path.write_text(text)
        return path

    def test_hub_example(self) -> None:
        """examples/hub.toml (three domains) passes check-config."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["check-config", str(self.materialize("hub.toml"))]), 0, err.getvalue())
        self.assertIn("OK (3 domain(s), 2 producer(s), 2 consumer(s))", out.getvalue())

    def test_pollers_example(self) -> None:
        """examples/pollers.toml passes check-config."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["check-config", str(self.materialize("pollers.toml"))]), 0, err.getvalue())
