"""
Tests for L{fedhub.amqp.spec}: the shipped AMQP 0-9-1 definition, as txamqp
loads it, against the protocol's numbers and Debian's C{amqp-specs} copy.
"""

# twisted.trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import SkipTest

from defusedxml import ElementTree
from twisted.trial.unittest import SynchronousTestCase

from fedhub.amqp.spec import SPEC_RESOURCE, load_spec, read_spec_bytes

DEBIAN_SPEC = Path("/usr/share/amqp/specs/0-9-1-rabbit/amqp0-9-1.stripped.extended.xml")

# Methods fedhub carries that the Debian file (older than them) lacks.
EXTRA_METHODS = {
    ("connection", "blocked"),
    ("connection", "unblocked"),
    ("connection", "update-secret"),
    ("connection", "update-secret-ok"),
}
EXTRA_CONSTANTS = {"no-route"}

# The published 0-9-1 XML forgets that basic.recover is answered by
# recover-ok; RabbitMQ answers it, and txamqp must route the answer to the
# caller instead of the delegate.
RESPONSE_ERRATA = {("basic", "recover"): ["recover-ok"]}


def _method(spec: Any, name: str) -> Any:
    return spec.parse_method(name)


def _field_list(container: Any) -> list[tuple[str, str]]:
    return [(f.name, f.type) for f in container]


class _Reference:
    """
    Debian's spec read with ElementTree, domains resolved to wire types.
    """

    def __init__(self, path: Path) -> None:
        root = ElementTree.parse(str(path)).getroot()
        domains = {d.get("name"): d.get("type") for d in root.findall("domain")}
        self.constants = {c.get("name"): int(c.get("value")) for c in root.findall("constant")}
        self.classes: dict[str, dict[str, Any]] = {}
        for klass in root.findall("class"):
            methods = {}
            for method in klass.findall("method"):
                methods[method.get("name")] = {
                    "id": int(method.get("index")),
                    "fields": self._fields(method, domains),
                    "content": method.get("content") == "1",
                    "responses": sorted(r.get("name") for r in method.findall("response")),
                }
            self.classes[klass.get("name")] = {
                "id": int(klass.get("index")),
                "fields": self._fields(klass, domains),
                "methods": methods,
            }

    @staticmethod
    def _fields(node: Any, domains: dict[str, str]) -> list[tuple[str, str]]:
        result = []
        for field in node.findall("field"):
            kind = field.get("domain") or field.get("type")
            while kind in domains and domains[kind] != kind:
                kind = domains[kind]
            result.append((field.get("name"), kind))
        return result


class LoadSpecTests(SynchronousTestCase):
    """
    Tests for L{load_spec} and the extensions it must carry.
    """

    def test_cached(self) -> None:
        """
        Every call returns the same parsed spec object.
        """
        self.assertIs(load_spec(), load_spec())

    def test_from_package_data(self) -> None:
        """
        The spec is read from the package's own XML resource, for AMQP 0-9-1.
        """
        spec = load_spec()
        self.assertTrue(read_spec_bytes().startswith(b"<?xml"))
        self.assertIn(SPEC_RESOURCE, spec.file)
        self.assertEqual((spec.major, spec.minor), (0, 9))

    def test_basic_nack(self) -> None:
        """
        basic.nack is class 60 method 120 with tag, multiple and requeue.
        """
        method = _method(load_spec(), "basic.nack")
        self.assertEqual((method.klass.id, method.id), (60, 120))
        self.assertEqual(
            _field_list(method.fields),
            [("delivery-tag", "longlong"), ("multiple", "bit"), ("requeue", "bit")],
        )

    def test_confirm_select(self) -> None:
        """
        confirm.select is class 85 method 10, answered by select-ok (11).
        """
        spec = load_spec()
        select = _method(spec, "confirm.select")
        select_ok = _method(spec, "confirm.select-ok")
        self.assertEqual((select.klass.id, select.id, select_ok.id), (85, 10, 11))
        self.assertEqual(_field_list(select.fields), [("nowait", "bit")])
        self.assertEqual(select.responses, [select_ok])

    def test_connection_blocked(self) -> None:
        """
        connection.blocked (10/60, with a reason) and unblocked (10/61) exist
        and are not responses, so txamqp hands them to the delegate.
        """
        spec = load_spec()
        blocked = _method(spec, "connection.blocked")
        unblocked = _method(spec, "connection.unblocked")
        self.assertEqual((blocked.klass.id, blocked.id, unblocked.id), (10, 60, 61))
        self.assertEqual(_field_list(blocked.fields), [("reason", "shortstr")])
        self.assertFalse(blocked.response or unblocked.response)

    def test_update_secret(self) -> None:
        """
        connection.update-secret is 10/70 with new-secret and reason, answered by 71.
        """
        spec = load_spec()
        update = _method(spec, "connection.update-secret")
        self.assertEqual((update.id, _method(spec, "connection.update-secret-ok").id), (70, 71))
        self.assertEqual(
            _field_list(update.fields), [("new-secret", "longstr"), ("reason", "shortstr")]
        )

    def test_exchange_bindings(self) -> None:
        """
        exchange.bind/bind-ok/unbind/unbind-ok are 40/30, 31, 40 and 51.
        """
        spec = load_spec()
        ids = [_method(spec, f"exchange.{n}").id for n in ("bind", "bind-ok", "unbind", "unbind-ok")]
        self.assertEqual(ids, [30, 31, 40, 51])

    def test_frame_constants(self) -> None:
        """
        The frame type and frame-end constants txamqp needs have their wire values.
        """
        constants = load_spec().constants.byname
        values = {n: constants[n].id for n in ("frame-method", "frame-header", "frame-body", "frame-heartbeat", "frame-end")}
        self.assertEqual(
            values,
            {"frame-method": 1, "frame-header": 2, "frame-body": 3, "frame-heartbeat": 8, "frame-end": 206},
        )

    def test_content_methods(self) -> None:
        """
        Exactly publish, return, deliver and get-ok carry content.
        """
        spec = load_spec()
        with_content = {
            f"{c.name}.{m.name}" for c in spec.classes for m in c.methods if m.content
        }
        self.assertEqual(with_content, {"basic.publish", "basic.return", "basic.deliver", "basic.get-ok"})

    def test_channel_methods_generated(self) -> None:
        """
        txamqp generated callable channel methods for the extensions.
        """
        klass = load_spec().klass
        for name in ("basic_nack", "confirm_select", "connection_blocked", "exchange_bind"):
            self.assertTrue(callable(getattr(klass, name)), name)


class DebianComparisonTests(SynchronousTestCase):
    """
    The shipped spec agrees with Debian's RabbitMQ-extended 0-9-1 XML.
    """

    def setUp(self) -> None:
        if not DEBIAN_SPEC.exists():
            if os.environ.get("CI") == "true":
                self.fail(f"{DEBIAN_SPEC} is missing: CI must install the amqp-specs package")
            raise SkipTest(f"{DEBIAN_SPEC} not installed (Debian package amqp-specs)")
        self.reference = _Reference(DEBIAN_SPEC)
        self.spec = load_spec()

    def test_constants(self) -> None:
        """
        Every constant of the reference has the same value here; only known extras are added.
        """
        ours = {c.name: c.id for c in self.spec.constants}
        for name, value in self.reference.constants.items():
            self.assertEqual(ours.get(name), value, name)
        self.assertEqual(set(ours) - set(self.reference.constants), EXTRA_CONSTANTS)

    def test_classes(self) -> None:
        """
        The same classes exist with the same ids and content properties.
        """
        ours = {c.name: c for c in self.spec.classes}
        self.assertEqual(set(ours), set(self.reference.classes))
        for name, ref in self.reference.classes.items():
            self.assertEqual(ours[name].id, ref["id"], name)
            self.assertEqual(_field_list(ours[name].fields), ref["fields"], name)

    def test_methods(self) -> None:
        """
        Every reference method exists with the same id, field names and wire
        types in order, content flag and responses; only known extras are added.
        """
        extras = set()
        for klass in self.spec.classes:
            ref_methods = self.reference.classes[klass.name]["methods"]
            for method in klass.methods:
                ref = ref_methods.get(method.name)
                if ref is None:
                    extras.add((klass.name, method.name))
                    continue
                where = f"{klass.name}.{method.name}"
                self.assertEqual(method.id, ref["id"], where)
                self.assertEqual(_field_list(method.fields), ref["fields"], where)
                self.assertEqual(method.content, ref["content"], where)
                expected = RESPONSE_ERRATA.get((klass.name, method.name), ref["responses"])
                self.assertEqual(sorted(r.name for r in method.responses), expected, where)
            missing = set(ref_methods) - {m.name for m in klass.methods}
            self.assertEqual(missing, set(), klass.name)
        self.assertEqual(extras, EXTRA_METHODS)
