"""
The AMQP 0-9-1 protocol definition that fedhub's transport speaks.

txamqp ships no protocol file, so fedhub carries its own
(C{fedhub/amqp/spec/amqp0-9-1.xml}, package data) with RabbitMQ's extensions:
publisher confirms, C{basic.nack}, exchange-to-exchange bindings,
C{connection.blocked}/C{unblocked} and C{connection.update-secret}.

L{load_spec} reads it through C{importlib.resources}, so it works from a
checkout, a wheel or a zip, and parses it once per process.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

from txamqp import spec as _txspec

SPEC_PACKAGE = "fedhub.amqp"
"""The package whose data holds the protocol file."""

SPEC_RESOURCE = "spec/amqp0-9-1.xml"
"""The protocol file's path inside L{SPEC_PACKAGE}."""


def read_spec_bytes() -> bytes:
    """
    Return the raw XML of the shipped AMQP 0-9-1 protocol definition.

    @raise FileNotFoundError: The package data is missing from the install.
    """
    resource = resources.files(SPEC_PACKAGE).joinpath(SPEC_RESOURCE)
    return resource.read_bytes()


@lru_cache(maxsize=1)
def load_spec() -> Any:
    """
    Parse the shipped protocol definition into txamqp's spec object.

    The result is cached: every caller shares one immutable-by-convention
    C{txamqp.spec.Spec}, which txamqp's client and channels need.  Methods are
    found as C{spec.classes.byname["basic"].methods.byname["nack"]} or with
    C{spec.parse_method("basic.nack")}.

    @return: A C{txamqp.spec.Spec} for AMQP 0-9-1.
    """
    name = f"{SPEC_PACKAGE}:{SPEC_RESOURCE}"
    return _txspec.load_string(read_spec_bytes(), specfilename=name)
