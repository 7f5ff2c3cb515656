"""
Edge cases of L{fedhub.schema}: references that cannot be resolved, bodies
nested deeper than a recursive schema can be checked, and a differential
test of compiled checks against C{jsonschema} on random schemas.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fedhub.errors import MessageError, SchemaValidationError
from fedhub.message import Message
from fedhub.schema import SchemaRegistry, compile_check

DRAFT4 = "http://json-schema.org/draft-04/schema#"
DRAFT7 = "http://json-schema.org/draft-07/schema#"
DRAFT2020 = "https://json-schema.org/draft/2020-12/schema"


def _nested(depth: int) -> dict[str, Any]:
    """
    A body of C{depth} objects, each the only property of the one above.
    """
    body: dict[str, Any] = {}
    node = body
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    return body


class ReferenceTests(SynchronousTestCase):
    """
    A schema's C{$ref}s are resolved when it is registered, within the
    schema itself, never by fetching anything.
    """

    def test_dangling_local_ref_refused(self) -> None:
        """A $ref to a place the schema does not have is refused at registration, naming the ref."""
        schemas = SchemaRegistry()
        for schema in ({"$ref": "#/definitions/nope"},
                       {"properties": {"a": {"$ref": "#/$defs/x"}}},
                       {"$schema": DRAFT2020, "$defs": {"x": {}},
                        "items": {"anyOf": [{"$ref": "#/$defs/y"}]}},
                       {"$ref": "other.json"}):
            error = self.assertRaises(MessageError, schemas.register, "s", schema)
            self.assertIn("$ref", str(error))
            self.assertFalse(schemas.known("s"), schema)

    def test_remote_ref_refused_without_fetching(self) -> None:
        """A $ref to another document is refused at registration; nothing is fetched, then or later."""
        fetched: list[Any] = []

        def urlopen(*args: Any, **kwargs: Any) -> Any:
            fetched.append(args)
            raise OSError("no network")

        self.patch(urllib.request, "urlopen", urlopen)
        schemas = SchemaRegistry()
        schema = {"type": "object", "properties": {"a": {"$ref": "http://127.0.0.1:9/a.json"}}}
        error = self.assertRaises(MessageError, schemas.register, "s", schema)
        self.assertIn("http://127.0.0.1:9/a.json", str(error))
        self.assertEqual(fetched, [])

    def test_resolvable_refs_accepted(self) -> None:
        """Refs into definitions, $defs, by $id, recursive ones and to a draft's meta-schema register and work."""
        schemas = SchemaRegistry()
        cases: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
            ({"$schema": DRAFT4, "definitions": {"n": {"type": "integer"}},
              "properties": {"a": {"$ref": "#/definitions/n"}}}, {"a": 1}, {"a": "x"}),
            ({"$schema": DRAFT2020, "$defs": {"n": {"type": "string"}},
              "properties": {"a": {"$ref": "#/$defs/n"}}}, {"a": "x"}, {"a": 1}),
            ({"$id": "http://fedoraproject.org/message-schema/x",
              "definitions": {"n": {"$id": "n.json", "type": "null"}},
              "properties": {"a": {"$ref": "n.json"}, "b": {"$ref": "#/definitions/n"}}},
             {"a": None, "b": None}, {"b": 1}),
            ({"$schema": DRAFT7, "definitions": {"node": {
                "type": "object", "additionalProperties": {"$ref": "#/definitions/node"}}},
              "$ref": "#/definitions/node"}, _nested(5), {"a": {"b": 1}}),
            ({"properties": {"s": {"$ref": DRAFT7}}}, {"s": {"type": "string"}}, {"s": {"type": 5}}),
            # A property named "$ref" and a "$ref" inside an enum are data, not references.
            ({"properties": {"$ref": {"enum": [{"$ref": "#/nowhere"}]}}},
             {"$ref": {"$ref": "#/nowhere"}}, {"$ref": 1}),
        ]
        for schema, valid, invalid in cases:
            schemas.register("s", schema)
            self.assertTrue(schemas.validate(Message.create("t.x", valid, schema="s")), schema)
            self.assertRaises(SchemaValidationError, schemas.validate,
                              Message.create("t.x", invalid, schema="s"))


class DepthTests(SynchronousTestCase):
    """
    A body nested deeper than C{jsonschema} can follow is refused as not
    matching, not with an exception the caller does not expect.
    """

    def test_deep_body_recursive_schema(self) -> None:
        """A recursive schema and a body nested 600 deep: SchemaValidationError, not RecursionError."""
        schemas = SchemaRegistry()
        schemas.register("tree", {
            "$schema": DRAFT7,
            "definitions": {"node": {"type": "object",
                                     "additionalProperties": {"$ref": "#/definitions/node"}}},
            "$ref": "#/definitions/node",
        })
        deep = Message.create("t.x", _nested(600), schema="tree")
        error = self.assertRaises(SchemaValidationError, schemas.validate, deep)
        self.assertIn("nested too deeply", str(error))
        self.assertEqual(error.schema, "tree")
        # The registry still works afterwards.
        self.assertTrue(schemas.validate(Message.create("t.x", _nested(20), schema="tree")))


# --- differential test ------------------------------------------------------

_SCALARS = (
    st.none() | st.booleans() | st.integers(-3, 3)
    | st.sampled_from([0.0, 1.0, -1.0, 1.5, 2.0, 10**20, 1e20, 2**53 + 1])
    | st.sampled_from(["", "a", "ab", "abc", "b\n", "\U0001F600", "\U0001F600\U0001F600", "é", "1"])
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["a", "b", "c", "ab"]), children, max_size=3),
    max_leaves=8,
)
_TYPES = st.sampled_from(["null", "boolean", "integer", "number", "string", "array", "object"])


def _schema_keywords(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """
    Schemas made of the keywords L{compile_check} compiles, with some it
    refuses mixed in (so refusing is exercised too).
    """
    return st.fixed_dictionaries({}, optional={
        "type": _TYPES | st.lists(_TYPES, min_size=1, max_size=3, unique=True),
        "enum": st.lists(_SCALARS, min_size=1, max_size=3),
        "const": _SCALARS,
        "minimum": st.sampled_from([0, 1, 1.5, -1]),
        "maximum": st.sampled_from([0, 1, 1.5, -1]),
        "exclusiveMaximum": st.sampled_from([1, 1.5]),
        "multipleOf": st.sampled_from([0.1, 2]),
        "minLength": st.integers(0, 3), "maxLength": st.integers(0, 3),
        "minItems": st.integers(0, 3), "maxItems": st.integers(0, 3),
        "uniqueItems": st.booleans(),
        "pattern": st.sampled_from(["^a", "a", "b$", "^\\w+$", "^.$"]),
        "format": st.sampled_from(["email", "date-time"]),
        "required": st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2, unique=True),
        "properties": st.dictionaries(st.sampled_from(["a", "b", "c"]), children, max_size=2),
        "additionalProperties": children,
        "patternProperties": st.dictionaries(st.sampled_from(["^a", "b"]), children, max_size=1),
        "items": children,
        "anyOf": st.lists(children, min_size=1, max_size=2),
        "allOf": st.lists(children, min_size=1, max_size=2),
        "oneOf": st.lists(children, min_size=1, max_size=2),
        "not": children,
    })


_LEAVES = st.booleans() | st.fixed_dictionaries({}, optional={
    "type": _TYPES, "minimum": st.just(1), "const": _SCALARS,
    "enum": st.lists(_SCALARS, min_size=1, max_size=2),
})
_SCHEMAS = st.recursive(_LEAVES, _schema_keywords, max_leaves=6)
_DRAFTS = st.sampled_from([None, DRAFT4, "http://json-schema.org/draft-06/schema#", DRAFT7,
                           "https://json-schema.org/draft/2019-09/schema", DRAFT2020])


class DifferentialTests(SynchronousTestCase):
    """
    Random schemas of every supported draft against random values: what a
    compiled check accepts, C{jsonschema} accepts, and the registry answers
    as C{jsonschema} does.
    """

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_SCHEMAS, _DRAFTS, st.lists(_VALUES, min_size=1, max_size=6))
    def test_compiled_agrees_with_jsonschema(self, schema: Any, draft: str | None,
                                             values: list[Any]) -> None:
        """A compiled check never accepts a value jsonschema refuses; the registry's verdict is jsonschema's."""
        if not isinstance(schema, dict):
            schema = {"allOf": [schema]}
        # The same schema as a body's property: how a message body reaches it.
        wrapped: dict[str, Any] = {"type": "object", "properties": {"v": schema}}
        if draft is not None:
            schema = {**schema, "$schema": draft}
            wrapped["$schema"] = draft
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.exceptions.SchemaError:
            return
        oracle = cls(schema)
        check = compile_check(schema)
        schemas = SchemaRegistry()
        schemas.register("w", wrapped)
        for value in values:
            expected = oracle.is_valid(value)
            if check is not None and check(value):
                self.assertTrue(expected, (schema, value))
            message = Message.create("t.x", {"v": value}, schema="w")
            if check is not None and check(message.body["v"]):
                self.assertTrue(expected, (schema, value))
            if expected:
                self.assertTrue(schemas.validate(message))
            else:
                self.assertRaises(SchemaValidationError, schemas.validate, message)
