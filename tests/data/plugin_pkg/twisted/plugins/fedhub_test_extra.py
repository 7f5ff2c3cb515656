"""
Plugins of a pretend third-party distribution, for fedhub's discovery tests:
a consumer plugin C{test-extra} and a producer plugin C{test-extra-source}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, Service
from twisted.plugin import IPlugin
from zope.interface import implementer

from fedhub.config import Option
from fedhub.interfaces import IConsumerPlugin, IMessageHandler, IProducerPlugin


@implementer(IMessageHandler)
class _Handler:
    """
    A handler that accepts every message and does nothing.
    """

    topics = ("#",)

    def handle(self, message: Any) -> None:
        """
        Accept the message.
        """

    def start(self) -> None:
        """
        Nothing to start.
        """

    def stop(self) -> None:
        """
        Nothing to stop.
        """


@implementer(IPlugin, IConsumerPlugin)
class ExtraConsumer:
    """
    A consumer plugin shipped outside fedhub.
    """

    name = "test-extra"
    description = "first test-extra"
    options = {"greeting": Option(str, "hello", "a word to say")}

    def build(self, context: Any) -> IMessageHandler:
        """
        Build the handler.
        """
        return _Handler()


@implementer(IPlugin, IProducerPlugin)
class ExtraSource:
    """
    A producer plugin shipped outside fedhub.
    """

    name = "test-extra-source"
    description = "a source that publishes nothing"
    options: dict[str, Option] = {}

    def build(self, context: Any) -> IService:
        """
        Build the (idle) service.
        """
        return Service()


extra_consumer = ExtraConsumer()
extra_source = ExtraSource()
