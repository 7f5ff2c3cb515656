"""fedhub: a message bus hub that turns services into AMQP publishers and consumers."""

__version__ = "0.1.0"

__all__ = ["__version__"]
