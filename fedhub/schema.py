"""
JSON Schema validation of message bodies, by registered schema name.

Schemas are registered under the name a message carries in its
C{fedora_messaging_schema} header.  A message whose schema name is unknown is
checked against the base schema (any JSON object) instead, without failing:
a consumer must keep working when a publisher is newer than it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

# jsonschema's own reference resolution, which it brings along.
import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema_specifications import REGISTRY as _SPECIFICATIONS

from fedhub.errors import MessageError, SchemaValidationError
from fedhub.message import BASE_SCHEMA, FrozenDict, FrozenList, Message

#: The base schema: any JSON object.
BASE_BODY_SCHEMA: Mapping[str, Any] = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "description": "Schema for message body",
    "type": "object",
}


#: A compiled check: C{True} when the value certainly matches its schema.
Check = Callable[[Any], bool]

# Keywords that say nothing about validity (a schema made only of these and
# the keywords compile_check understands is compiled).
_ANNOTATIONS = frozenset({
    "$schema", "$id", "id", "$comment", "title", "description", "default", "examples",
    "definitions", "$defs", "format", "readOnly", "writeOnly", "deprecated",
    "contentMediaType", "contentEncoding",
})
# The classes of the values each JSON type takes: a type is checked by the
# value's class alone.  That is stricter than the drafts (no subclasses but
# the frozen containers of a message body; no integral float for an
# integer, which drafts 6+ take: such a value falls back to jsonschema),
# never more lenient.
_TYPE_CLASSES: dict[str, frozenset[type]] = {
    "null": frozenset({type(None)}),
    "boolean": frozenset({bool}),
    "integer": frozenset({int}),
    "number": frozenset({int, float}),
    "string": frozenset({str}),
    "array": frozenset({list, FrozenList}),
    "object": frozenset({dict, FrozenDict}),
}


def _type_only(schema: Any) -> frozenset[type] | None:
    """
    The classes a schema that says nothing but C{type} allows (annotations
    aside), for a check without a function call; C{None} for any other
    schema.
    """
    if not isinstance(schema, Mapping):
        return None
    classes: frozenset[type] | None = None
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key != "type":
            return None
        classes = _type_classes(value)
    return classes


def _type_classes(value: Any) -> frozenset[type] | None:
    """
    The classes the value of a C{type} keyword allows, or C{None} when it
    is not a type name or a list of them.
    """
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or any(n not in _TYPE_CLASSES for n in names):
        return None
    return frozenset().union(*(_TYPE_CLASSES[n] for n in names))


def _always(value: Any) -> bool:
    return True


def _never(value: Any) -> bool:
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compile_check(schema: Any, depth: int = 0) -> Check | None:
    """
    Compile a JSON schema (drafts 4 to 2020-12) into a plain Python check,
    or C{None} when it uses a keyword this compiler does not know (C{$ref},
    C{patternProperties}, C{if}, ...).

    The check may be stricter than the schema (an integral float for
    C{integer}, a non-string C{enum} value: it answers C{False}) but never
    more lenient, so a C{True} is final and a C{False} is settled by
    C{jsonschema}, which also finds the error to report.  Checking the
    bugmail body this way takes a few microseconds instead of about half a
    millisecond.
    """
    if depth > 64:
        return None
    if schema is True:
        return _always
    if schema is False:
        return _never
    if not isinstance(schema, Mapping):
        return None
    checks: list[Check] = []
    classes: frozenset[type] | None = None
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "type":
            # By the value's class, which every other check then can take
            # for granted: stricter than the drafts for subclasses (but
            # those of a message body's frozen containers) and for
            # integral floats, never more lenient.
            classes = _type_classes(value)
            if classes is None:
                return None
            continue
        check = _compile_keyword(schema, key, value, depth)
        if check is None:
            return None
        if check is not _always:
            checks.append(check)
    all_checks = tuple(checks)
    if classes is not None:
        allowed = classes
        if not all_checks:

            def of_type(v: Any) -> bool:
                return v.__class__ in allowed

            return of_type

        def typed_every(v: Any) -> bool:
            if v.__class__ not in allowed:
                return False
            for check in all_checks:
                if not check(v):
                    return False
            return True

        return typed_every
    if not all_checks:
        return _always
    return _all_of(all_checks)


def _all_of(checks: tuple[Check, ...]) -> Check:
    """
    A check that passes when every one of C{checks} does, trying them in
    order and stopping at the first that fails.
    """
    if len(checks) == 1:
        return checks[0]

    def every(v: Any) -> bool:
        for check in checks:
            if not check(v):
                return False
        return True

    return every


def _compile_keyword(schema: Mapping[str, Any], key: str, value: Any, depth: int) -> Check | None:
    if key == "properties":
        if not isinstance(value, Mapping):
            return None
        compiled = []
        typed = []
        for name, sub in value.items():
            check = compile_check(sub, depth + 1)
            if check is None:
                return None
            classes = _type_only(sub)
            if classes is not None:
                typed.append((name, classes))
            elif check is not _always:
                compiled.append((name, check))
        props = tuple(compiled)
        typed_props = tuple(typed)

        def properties(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            # Properties whose schema is a type alone, checked by class in
            # place; then the others, each by its check.
            for name, classes in typed_props:
                if name in v and v[name].__class__ not in classes:
                    return False
            for name, check in props:
                if name in v and not check(v[name]):
                    return False
            return True

        return properties
    if key == "required":
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            return None
        names = frozenset(value)
        return lambda v: not isinstance(v, dict) or v.keys() >= names
    if key == "additionalProperties":
        if "patternProperties" in schema:
            return None
        declared = schema.get("properties", {})
        if not isinstance(declared, Mapping):
            return None
        known = frozenset(declared)
        extra = compile_check(value, depth + 1)
        if extra is None:
            return None
        if extra is _always:
            return _always

        def additional(v: Any) -> bool:
            if isinstance(v, dict):
                for name, item in v.items():
                    if name not in known and not extra(item):
                        return False
            return True

        return additional
    if key == "items":
        if isinstance(value, list) or "prefixItems" in schema:
            return None
        item = compile_check(value, depth + 1)
        if item is None:
            return None
        item_classes = _type_only(value)
        if item_classes is not None:

            def typed_items(v: Any) -> bool:
                if isinstance(v, list):
                    for x in v:
                        if x.__class__ not in item_classes:
                            return False
                return True

            return typed_items

        def items(v: Any) -> bool:
            if isinstance(v, list):
                for x in v:
                    if not item(x):
                        return False
            return True

        return items
    if key in ("enum", "const"):
        allowed = value if key == "enum" else [value]
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            return None
        choices = frozenset(allowed)
        return lambda v: isinstance(v, str) and v in choices
    if key in ("minimum", "maximum"):
        if not _is_number(value):
            return None
        bound = value
        if key == "minimum":
            return lambda v: not _is_number(v) or v >= bound
        return lambda v: not _is_number(v) or v <= bound
    if key in ("minLength", "maxLength", "minItems", "maxItems"):
        if type(value) is not int or value < 0:
            return None
        size = value
        kind: tuple[type[str] | type[list[Any]], ...] = (str,) if key.endswith("Length") else (list,)
        if key.startswith("min"):
            return lambda v: not isinstance(v, kind) or len(v) >= size
        return lambda v: not isinstance(v, kind) or len(v) <= size
    if key == "pattern":
        if not isinstance(value, str):
            return None
        try:
            search = re.compile(value).search
        except re.error:
            return None
        return lambda v: not isinstance(v, str) or search(v) is not None
    if key in ("anyOf", "allOf", "oneOf"):
        if not isinstance(value, list) or not value:
            return None
        subs = []
        for sub in value:
            check = compile_check(sub, depth + 1)
            if check is None:
                return None
            subs.append(check)
        options = tuple(subs)

        def any_of(v: Any) -> bool:
            for option in options:
                if option(v):
                    return True
            return False

        if key == "anyOf":
            return any_of
        if key == "allOf":
            return _all_of(options)
        # oneOf: a branch's False may be its check's strictness, so "exactly
        # one" can be told only when no value can match two branches: when
        # their types do not overlap (e.g. an object or null).  Then it is
        # anyOf.
        if not _disjoint_types(value):
            return None
        return any_of
    if key == "not":
        # The negation of a stricter check would be more lenient.
        return None
    return None


def _disjoint_types(branches: list[Any]) -> bool:
    """
    Whether no value can match two of C{branches}, judged by their C{type}
    keywords alone (C{integer} and C{number} overlap).
    """
    seen: set[str] = set()
    for branch in branches:
        names = branch.get("type") if isinstance(branch, Mapping) else None
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names:
            return False
        kinds = {"number" if n == "integer" else n for n in names}
        if kinds & seen:
            return False
        seen |= kinds
    return True


#: What jsonschema resolves references with: the drafts' meta-schemas only,
#: never fetching a document (its default fetches over HTTP, synchronously).
_NO_FETCHING: Any = referencing.Registry()


def _unresolvable_ref(cls: Any, schema: Mapping[str, Any]) -> str | None:
    """
    The first C{$ref} of C{schema} that does not resolve within the schema
    itself (or to a draft's meta-schema), or C{None} when they all do.

    References are looked up, not followed, so a recursive schema is
    walked once; the walk goes through subschemas only, so a property named
    C{$ref} or an C{enum} value holding one is not taken for a reference.
    """
    specification = referencing.jsonschema.specification_with(cls.ID_OF(cls.META_SCHEMA))
    root = specification.create_resource(schema)
    pending = [(root, _SPECIFICATIONS.resolver_with_root(root))]
    while pending:
        resource, resolver = pending.pop()
        resolver = resolver.in_subresource(resource)
        contents = resource.contents
        ref = contents.get("$ref") if isinstance(contents, Mapping) else None
        if isinstance(ref, str):
            try:
                resolver.lookup(ref)
            except referencing.exceptions.Unresolvable:
                return ref
        pending.extend((sub, resolver) for sub in resource.subresources())
    return None


class SchemaRegistry:
    """
    Named JSON schemas for message bodies.

    Each schema is compiled once when registered: a C{jsonschema} validator
    (for the error of a body that does not match) and, when the schema's
    keywords allow it, a plain Python check (L{compile_check}) that settles
    the common case, a matching body, on its own.
    """

    def __init__(self) -> None:
        self._validators: dict[str, Any] = {}
        self._checks: dict[str, Check | None] = {}
        self.register(BASE_SCHEMA, BASE_BODY_SCHEMA)

    def register(self, name: str, schema: Mapping[str, Any]) -> None:
        """
        Register (or replace) the schema for C{name}.

        @raise MessageError: when C{schema} is not a valid JSON schema, or
            when one of its C{$ref}s does not resolve within the schema
            itself (documents elsewhere are never fetched).
        """
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.exceptions.SchemaError as e:
            raise MessageError(f"schema {name!r} is not a valid JSON schema: {e.message}") from None
        # A reference that does not resolve would fail every message checked
        # against the schema; one to another document would be fetched by
        # jsonschema, blocking the reactor, for each.
        ref = _unresolvable_ref(cls, schema)
        if ref is not None:
            raise MessageError(
                f"schema {name!r} is not usable: its $ref {ref!r} does not point into the "
                f"schema itself (other documents are not fetched)"
            )
        self._validators[name] = cls(schema, registry=_NO_FETCHING)
        self._checks[name] = (
            compile_check(schema) if cls is not jsonschema.Draft3Validator else None
        )

    def known(self, name: str) -> bool:
        """
        Whether a schema is registered under C{name}.
        """
        return name in self._validators

    def names(self) -> list[str]:
        """
        The registered names, sorted.
        """
        return sorted(self._validators)

    def validate(self, message: Message) -> bool:
        """
        Check a message's body against its schema.

        @return: C{True} when its own schema was used, C{False} when its name
            is unknown and the base schema was used.
        @raise SchemaValidationError: when the body does not match.
        """
        name = message.schema
        validator = self._validators.get(name)
        known = validator is not None
        if validator is None:
            name = BASE_SCHEMA
            validator = self._validators[name]
        check = self._checks.get(name)
        if check is not None and check(message.body):
            return known
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(message.body))
        except RecursionError:
            # A recursive schema follows the body down, a few frames per
            # level: a body can be nested deeper than that can go.
            raise SchemaValidationError(
                message.schema, "the body is nested too deeply to be checked"
            ) from None
        if error is not None:
            path = "$" + "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
            )
            raise SchemaValidationError(message.schema, error.message, path)
        return known


#: The process-wide registry the hub uses; plugins register their schemas here.
registry = SchemaRegistry()
