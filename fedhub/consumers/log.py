"""
The C{log} consumer: one human-readable line per message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from fedhub.config import Option
from fedhub.interfaces import IConsumerPlugin, IMessageHandler
from fedhub.logs import HubLogger
from fedhub.message import Message
from fedhub.plugins import PluginContext
from fedhub.text import escape_control, summarize


def format_line(message: Message, limit: int = 160) -> str:
    """
    The line the log consumer writes: send time, topic, summary.
    """
    when = message.sent_at.isoformat() if message.sent_at is not None else "-"
    return f"{when} {escape_control(message.topic)} {summarize(message, limit)}"


@implementer(IMessageHandler)
class LogHandler:
    """
    Logs every message it gets as one line at info level.
    """

    log = HubLogger()

    def __init__(self, name: str, topics: tuple[str, ...] = ("#",), limit: int = 160) -> None:
        self.name = name
        self.topics = topics
        self.limit = limit

    def handle(self, message: Message) -> None:
        self.log.info(
            "{line}",
            line=format_line(message, self.limit),
            consumer=self.name,
            msg_id=message.id,
            topic=message.topic,
        )

    def start(self) -> None:
        """
        Nothing to prepare.
        """

    def stop(self) -> None:
        """
        Nothing to release.
        """


@implementer(IPlugin, IConsumerPlugin)
class LogPlugin:
    """
    The plugin that builds L{LogHandler}s.
    """

    name = "log"
    description = "Log one human-readable line (time, topic, summary) per message."
    options: Mapping[str, Option] = {
        "max_length": Option(int, 160, "Cut summaries to this many characters.",
                             check=lambda v: None if v >= 20 else "must be at least 20"),
    }

    def build(self, context: PluginContext) -> LogHandler:
        topics: tuple[str, ...] = ("#",)
        if context.component is not None and context.component.topics:
            topics = tuple(context.component.topics)
        limit: Any = context.options.get("max_length", 160)
        return LogHandler(context.name, topics, int(limit))
