"""
The C{package-watch} consumer: watch messages for packages, and publish one
summary message for every message that names a watched package.

fedora-messaging marks the packages a message is about with headers
C{fedora_messaging_rpm_<name>: true}.  For a message whose headers name
packages matching C{packages} (names or shell-style patterns such as
C{python3-*}), this consumer publishes, in its own domain::

    topic   <topic_prefix>.<environment>.package-watch.match
    body    {"packages": [...], "topic": ..., "msg_id": ..., "summary": ...}
    headers fedora_messaging_rpm_<name>: true for each matched package

Messages on its own summary topic are ignored, so a consumer bound to
C{#} does not feed on itself.  A publisher that can not take the summary
now (L{TemporarilyUnavailable}) makes the message a L{Retry}.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from fedhub.config import Option
from fedhub.errors import Retry, TemporarilyUnavailable
from fedhub.interfaces import IConsumerPlugin, IMessageHandler, IPublisher
from fedhub.message import Message
from fedhub.plugins import PluginContext
from fedhub.text import summarize

__all__ = ["PackageWatchPlugin", "PackageWatcher", "RPM_HEADER_PREFIX", "packages_of"]

#: fedora-messaging's header prefix naming a package a message is about.
RPM_HEADER_PREFIX = "fedora_messaging_rpm_"

#: The topic suffix of the summaries.
MATCH_SUFFIX = "package-watch.match"


def packages_of(message: Message) -> list[str]:
    """
    The packages a message names by its C{fedora_messaging_rpm_*} headers
    (those set to true), sorted.
    """
    return sorted(
        name[len(RPM_HEADER_PREFIX):]
        for name, value in message.headers.items()
        if name.startswith(RPM_HEADER_PREFIX) and value is True and len(name) > len(RPM_HEADER_PREFIX)
    )


@implementer(IMessageHandler)
class PackageWatcher:
    """
    Publishes a summary for messages about watched packages.

    @ivar matched: How many messages named a watched package.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        topics: tuple[str, ...],
        patterns: tuple[str, ...],
        publisher: IPublisher,
        summary_topic: str,
    ) -> None:
        self.name = name
        self.topics = topics
        self.patterns = patterns
        self.publisher = publisher
        self.summary_topic = summary_topic
        self.matched = 0

    def start(self) -> None:
        """
        Nothing to prepare.
        """

    def stop(self) -> None:
        """
        Nothing to release.
        """

    def watched(self, message: Message) -> list[str]:
        """
        The watched packages a message names.
        """
        return [
            package
            for package in packages_of(message)
            if any(fnmatch.fnmatchcase(package, pattern) for pattern in self.patterns)
        ]

    def handle(self, message: Message) -> Deferred[None]:
        """
        Publish a summary when C{message} names a watched package.
        """
        if message.topic == self.summary_topic:
            return succeed(None)
        packages = self.watched(message)
        if not packages:
            return succeed(None)
        self.matched += 1
        summary = Message.create(
            self.summary_topic,
            {
                "packages": packages,
                "topic": message.topic,
                "msg_id": message.id,
                "summary": summarize(message, 200),
            },
            headers={f"{RPM_HEADER_PREFIX}{package}": True for package in packages},
        )
        self.log.info(
            "Consumer {consumer}: {msg_id} ({topic}) is about {packages}",
            consumer=self.name,
            msg_id=message.id,
            topic=message.topic,
            packages=", ".join(packages),
        )
        d: Deferred[None] = self.publisher.publish(summary)
        d.addErrback(self._refused)
        return d

    def _refused(self, failure: Failure) -> Any:
        if isinstance(failure.value, TemporarilyUnavailable):
            raise Retry(f"can not publish the summary now: {failure.value}")
        return failure


def _check_patterns(value: list[str]) -> str | None:
    if not value:
        return "name at least one package or pattern"
    if any(not pattern for pattern in value):
        return "a package pattern can not be empty"
    return None


@implementer(IPlugin, IConsumerPlugin)
class PackageWatchPlugin:
    """
    The plugin that builds L{PackageWatcher}s.
    """

    name = "package-watch"
    description = "Publish a summary for each message about a watched package."
    options: Mapping[str, Option] = {
        "packages": Option(list, help="package names or shell-style patterns to watch",
                           check=_check_patterns, items=str),
    }

    def build(self, context: PluginContext) -> PackageWatcher:
        """
        Build a watcher publishing through the component's own publisher.
        """
        topics: tuple[str, ...] = ("#",)
        if context.component is not None and context.component.topics:
            topics = tuple(context.component.topics)
        return PackageWatcher(
            context.name,
            topics,
            tuple(context.options["packages"]),
            context.publisher,
            context.topic(MATCH_SUFFIX),
        )
