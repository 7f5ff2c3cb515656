"""
Tests for the compiled schema checks of L{fedhub.schema}: a compiled check
never accepts what C{jsonschema} refuses, it is used for the bugmail schema,
and a body it does not accept is still judged (and its error reported) by
C{jsonschema}.
"""

from __future__ import annotations

import os
from typing import Any

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fedhub.errors import SchemaValidationError
from fedhub.message import Message
from fedhub.producers.bugzilla.parser import parse_bugmail
from fedhub.producers.bugzilla.producer import MAIL_SCHEMA, build_body, load_mail_schema
from fedhub.schema import SchemaRegistry, compile_check, registry

DATA = os.path.join(os.path.dirname(__file__), "data", "bugzilla")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-5, 5, allow_nan=False)
    | st.sampled_from(["", "new", "changed", "x" * 12, "a@b"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b", "bug_id", "who", "type", "x"]), children,
                      max_size=4),
    max_leaves=12,
)

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer", "minimum": 1}}},
    {"type": ["string", "null"], "minLength": 1, "maxLength": 5, "pattern": "^[a-z]"},
    {"type": "array", "items": {"type": "number", "maximum": 2}, "minItems": 1, "maxItems": 3},
    {"type": "object", "additionalProperties": {"type": "string"}, "properties": {"b": {}}},
    {"type": "object", "additionalProperties": False, "properties": {"a": True}},
    {"anyOf": [{"type": "integer"}, {"enum": ["new", "changed"]}]},
    {"allOf": [{"type": "object"}, {"required": ["x"]}]},
    {"const": "a@b"},
    {"oneOf": [{"type": "object", "required": ["a"]}, {"type": "null"}]},
    {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer"},
]


class CompileTests(SynchronousTestCase):
    """
    What is compiled, and that a compiled check is never more lenient.
    """

    def test_unknown_keywords_not_compiled(self) -> None:
        """A schema with a keyword the compiler does not know is left to jsonschema entirely."""
        for schema in ({"$ref": "#/definitions/x"}, {"patternProperties": {"a": {}}},
                       {"not": {"type": "string"}}, {"oneOf": [{}, {}]},
                       {"oneOf": [{"type": "integer"}, {"type": "number"}]},
                       {"properties": {"a": {"if": {}}}}, {"items": [{}, {}]},
                       {"type:": "null"}, {"exclusiveMinimum": True, "minimum": 1}):
            self.assertIsNone(compile_check(schema), schema)

    def test_mail_schema_compiled(self) -> None:
        """The bugmail schema, as registered (definitions inlined), compiles."""
        from fedhub.producers.bugzilla.producer import _inline_definitions

        self.assertIsNotNone(compile_check(_inline_definitions(load_mail_schema())))
        self.assertIsNotNone(registry._checks[MAIL_SCHEMA])

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(SCHEMAS), json_values)
    def test_never_more_lenient(self, schema: dict[str, Any], value: Any) -> None:
        """Whatever a compiled check accepts, jsonschema accepts too."""
        check = compile_check(schema)
        assert check is not None
        if check(value):
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
            self.assertTrue(cls(schema).is_valid(value), (schema, value))

    def test_strict_where_drafts_differ(self) -> None:
        """An integral float is not taken for an integer by the check: jsonschema decides."""
        check = compile_check({"type": "integer"})
        assert check is not None
        self.assertFalse(check(1.0))
        self.assertFalse(check(True))
        self.assertTrue(check(3))


class RegistryTests(SynchronousTestCase):
    """
    The registry uses the compiled check and falls back to jsonschema.
    """

    def body(self, name: str = "04_changed_status_resolution_with_comment.eml") -> dict[str, Any]:
        with open(os.path.join(DATA, name), "rb") as f:
            return build_body(parse_bugmail(f.read()))

    def test_sample_bodies_valid(self) -> None:
        """Every sample mail's body passes both the compiled check and jsonschema."""
        check = registry._checks[MAIL_SCHEMA]
        validator = registry._validators[MAIL_SCHEMA]
        assert check is not None
        for name in sorted(os.listdir(DATA)):
            if name.endswith(".eml") and not name.startswith("14_"):
                body = self.body(name)
                self.assertTrue(check(body), name)
                self.assertTrue(validator.is_valid(body), name)

    def test_invalid_bodies_reported_by_jsonschema(self) -> None:
        """Bodies the check refuses get jsonschema's error with its path."""
        for change, path in [({"bug_id": 0}, "$.bug_id"), ({"event_type": "moved"}, "$.event_type"),
                             ({"headers": {"X-Bugzilla-Who": 5}}, "$.headers.X-Bugzilla-Who"),
                             ({"keywords": ["a", None]}, "$.keywords[1]")]:
            message = Message.create("t.x", {**self.body(), **change}, schema=MAIL_SCHEMA)
            error = self.assertRaises(SchemaValidationError, registry.validate, message)
            self.assertIn(path, str(error))

    def test_fallback_accepts_what_check_refuses(self) -> None:
        """A body the stricter check refuses but the schema allows (1.0 for an integer) is valid."""
        schemas = SchemaRegistry()
        schemas.register("n", {"type": "object", "properties": {"n": {"type": "integer"}}})
        self.assertTrue(schemas.validate(Message.create("t.x", {"n": 1.0}, schema="n")))
        self.assertRaises(SchemaValidationError, schemas.validate,
                          Message.create("t.x", {"n": 1.5}, schema="n"))


#: Schemas whose properties and items are a type alone (checked by class).
TYPED_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": ["integer", "null"], "description": "b"},
        "x": {"type": "array", "items": {"type": "number"}}, "type": {"type": "object"},
        "who": {"type": "boolean"}, "bug_id": {"type": ["array", "string", "null"]}}},
    {"type": "array", "items": {"type": ["string", "null"]}},
    {"type": "object", "additionalProperties": {"type": "integer"}, "properties": {"a": {"type": "array"}}},
]


def _by_checks(schema: Any) -> Any:
    """
    The same schema with every type-only part given a keyword that changes
    nothing (C{minLength: 0}), so it is compiled into a call to its check
    rather than a check by class.
    """
    if not isinstance(schema, dict):
        return schema
    copy = dict(schema)
    if "properties" in copy:
        copy["properties"] = {name: _by_checks(sub) for name, sub in copy["properties"].items()}
    for key in ("items", "additionalProperties"):
        if key in copy:
            copy[key] = _by_checks(copy[key])
    if "type" in copy:
        copy["minLength"] = 0
    return copy


class TypedPartsTests(SynchronousTestCase):
    """
    Properties and items that are a type alone, checked by class, answer as
    their checks do.
    """

    @settings(max_examples=500, deadline=None)
    @given(st.sampled_from(TYPED_SCHEMAS), json_values)
    def test_same_as_checks(self, schema: dict[str, Any], value: Any) -> None:
        """Plain and frozen values (as a message body holds them) get the same answer."""
        check = compile_check(schema)
        by_checks = compile_check(_by_checks(schema))
        assert check is not None and by_checks is not None
        self.assertEqual(check(value), by_checks(value), value)
        frozen = Message("t.x", {"v": value}).body["v"]
        self.assertEqual(check(frozen), by_checks(frozen), value)
        if check(value):
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
            self.assertTrue(cls(schema).is_valid(value), (schema, value))

    def test_subclasses_left_to_jsonschema(self) -> None:
        """A subclass of str or int is not taken by class: the check says no and jsonschema decides."""

        class Text(str):
            pass

        check = compile_check({"type": "object", "properties": {"a": {"type": "string"}}})
        assert check is not None
        self.assertTrue(check({"a": "x"}))
        self.assertFalse(check({"a": Text("x")}))
        self.assertFalse(check({"a": 1}))

    @settings(max_examples=300, deadline=None)
    @given(json_values)
    def test_types_by_class(self, value: Any) -> None:
        """For JSON values, plain or frozen, a type checked by class answers as the type's definition."""
        definitions = {
            "null": lambda v: v is None,
            "boolean": lambda v: v is True or v is False,
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "string": lambda v: isinstance(v, str),
            "array": lambda v: isinstance(v, list),
            "object": lambda v: isinstance(v, dict),
        }
        frozen = Message("t.x", {"v": value}).body["v"]
        for name, definition in definitions.items():
            check = compile_check({"type": name})
            assert check is not None
            self.assertEqual(check(value), definition(value), (name, value))
            self.assertEqual(check(frozen), definition(frozen), (name, value))
        check = compile_check({"type": ["string", "null", "array"]})
        assert check is not None
        self.assertEqual(check(value), value is None or isinstance(value, (str, list)))
