"""
The bus contract (L{tests.bus_contract}) kept by L{AMQPBus} on the shared
RabbitMQ at 127.0.0.1:5672.  With C{CI=true} a missing broker fails these
tests; elsewhere they are skipped.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.trial.unittest import TestCase

from fedhub.amqp.transport import AMQPBus
from fedhub.amqp.url import parse_url
from tests.broker import require_shared_broker
from tests.bus_contract import BusContractMixin


class AMQPBusContractTests(BusContractMixin, TestCase):
    """
    The bus contract, kept by the AMQP transport on a real broker.
    """

    timeout = 60

    def setUp(self) -> None:
        require_shared_broker(self)

    def make_bus(self) -> Deferred[Any]:
        from twisted.internet import reactor

        name = f"fedhub-contract-{uuid.uuid4().hex}"
        bus = AMQPBus(
            "contract",
            parse_url(f"amqp://guest:guest@127.0.0.1:5672/?connection_name={name}"),
            reactor=cast(IReactorTime, reactor),
        )
        bus.startService()
        self.addCleanup(bus.stopService)
        connected = bus.when_connected()
        connected.addTimeout(10, cast(IReactorTime, reactor))
        return connected.addCallback(lambda _: bus)
