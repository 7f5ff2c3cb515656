"""
JSON Schema validation of message bodies, by registered schema name.

Schemas are registered under the name a message carries in its
C{fedora_messaging_schema} header.  A message whose schema name is unknown is
checked against the base schema (any JSON object) instead, without failing:
a consumer must keep working when a publisher is newer than it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from fedhub.errors import MessageError, SchemaValidationError
from fedhub.message import BASE_SCHEMA, Message

#: The base schema: any JSON object.
BASE_BODY_SCHEMA: Mapping[str, Any] = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "description": "Schema for message body",
    "type": "object",
}


class SchemaRegistry:
    """
    Named JSON schemas for message bodies.
    """

    def __init__(self) -> None:
        self._validators: dict[str, Any] = {}
        self.register(BASE_SCHEMA, BASE_BODY_SCHEMA)

    def register(self, name: str, schema: Mapping[str, Any]) -> None:
        """
        Register (or replace) the schema for C{name}.

        @raise MessageError: when C{schema} is not a valid JSON schema.
        """
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.exceptions.SchemaError as e:
            raise MessageError(f"schema {name!r} is not a valid JSON schema: {e.message}") from None
        self._validators[name] = cls(schema)

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
        validator = self._validators.get(message.schema)
        known = validator is not None
        if validator is None:
            validator = self._validators[BASE_SCHEMA]
        error = jsonschema.exceptions.best_match(validator.iter_errors(message.body))
        if error is not None:
            path = "$" + "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
            )
            raise SchemaValidationError(message.schema, error.message, path)
        return known


#: The process-wide registry the hub uses; plugins register their schemas here.
registry = SchemaRegistry()
