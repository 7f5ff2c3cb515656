"""
A second module that claims the consumer name C{test-extra}: discovery keeps
the one from C{fedhub_test_extra} (it sorts first) and warns about this one.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from fedhub.interfaces import IConsumerPlugin, IMessageHandler


@implementer(IPlugin, IConsumerPlugin)
class DuplicateConsumer:
    """
    A consumer plugin whose name is already taken.
    """

    name = "test-extra"
    description = "second test-extra"
    options: dict[str, Any] = {}

    def build(self, context: Any) -> IMessageHandler:
        """
        Never used.
        """
        raise NotImplementedError("shadowed by fedhub_test_extra")


duplicate_consumer = DuplicateConsumer()
