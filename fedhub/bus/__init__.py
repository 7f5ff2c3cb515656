"""
fedhub's in-process transport: the bus a domain uses when it has no broker.

L{MemoryBus} provides L{fedhub.interfaces.IBus} like the AMQP transport does,
with RabbitMQ's routing, acknowledgement and dead-lettering semantics, so
that plugins and tests run without a broker.  Its messages never leave the
process.
"""

from fedhub.bus.memory import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_QUEUE_LENGTH,
    MemoryBus,
    MemoryDelivery,
    MemorySubscription,
    record_death,
)

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_QUEUE_LENGTH",
    "MemoryBus",
    "MemoryDelivery",
    "MemorySubscription",
    "record_death",
]
