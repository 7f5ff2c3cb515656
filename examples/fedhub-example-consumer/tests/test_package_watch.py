"""
Tests of the package-watch consumer, run the way fedhub runs it, with
C{fedhub.testing.ConsumerHarness}.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fedhub.config import HubSettings
from fedhub.errors import ConfigError, TemporarilyUnavailable
from fedhub.interfaces import IConsumerPlugin, IMessageHandler
from fedhub.message import Message
from fedhub.testing import ConsumerHarness
from fedhub_example_consumer.package_watch import PackageWatchPlugin, packages_of

BUILD = "org.fedoraproject.prod.buildsys.build.state.change"
SUMMARY = "org.fedoraproject.prod.package-watch.match"


def about(*packages: str, **body: object) -> Message:
    """
    A build message naming packages the fedora-messaging way.
    """
    headers = {f"fedora_messaging_rpm_{p}": True for p in packages}
    return Message.create(BUILD, body or {"summary": "build done"}, headers=headers)


class PackageWatchTests(SynchronousTestCase):
    """
    The consumer watching C{kernel} and C{python3-*}.
    """

    def setUp(self) -> None:
        self.harness = ConsumerHarness(
            PackageWatchPlugin(),
            {"packages": ["kernel", "python3-*"]},
            hub=HubSettings(environment="prod", state_dir=self.mktemp()),
        )
        self.harness.start()

    def test_provides(self) -> None:
        """The plugin and its handler provide fedhub's interfaces."""
        verifyObject(IConsumerPlugin, PackageWatchPlugin())
        verifyObject(IMessageHandler, self.harness.handler)

    def test_match_publishes_summary(self) -> None:
        """A message about watched packages is acked and summarized once."""
        message = about("kernel", "python3-requests", "bash")
        settled = self.successResultOf(self.harness.deliver(message))
        self.assertEqual(settled.outcome, "acked")
        (summary,) = self.harness.published
        self.assertEqual(summary.topic, SUMMARY)
        self.assertEqual(summary.body["packages"], ["kernel", "python3-requests"])
        self.assertEqual(summary.body["msg_id"], message.id)
        self.assertEqual(summary.body["topic"], BUILD)
        self.assertEqual(summary.body["summary"], "build done")
        self.assertEqual(packages_of(summary), ["kernel", "python3-requests"])

    def test_no_match(self) -> None:
        """A message about other packages, or none, is acked without a summary."""
        for message in (about("bash"), about(), about("python2-x")):
            self.assertEqual(self.successResultOf(self.harness.deliver(message)).outcome, "acked")
        self.assertEqual(self.harness.published, [])

    def test_false_header_ignored(self) -> None:
        """Only package headers set to true count."""
        message = Message.create(BUILD, {}, headers={"fedora_messaging_rpm_kernel": False})
        self.successResultOf(self.harness.deliver(message))
        self.assertEqual(self.harness.published, [])

    def test_own_summaries_ignored(self) -> None:
        """Its own summary topic never produces another summary."""
        message = Message.create(SUMMARY, {}, headers={"fedora_messaging_rpm_kernel": True})
        self.successResultOf(self.harness.deliver(message))
        self.assertEqual(self.harness.published, [])

    def test_publisher_busy_retries(self) -> None:
        """A publisher that can not take the summary now makes the message a retry."""
        self.harness.publisher.refuse_with = TemporarilyUnavailable("outbox full")
        settled = self.successResultOf(self.harness.deliver(about("kernel")))
        self.assertEqual(settled.outcome, "retried")
        self.harness.publisher.refuse_with = None
        self.harness.advance(10)
        self.assertEqual(len(self.harness.published), 1)
        self.assertEqual(self.harness.settled[-1].outcome, "acked")

    def test_options_checked(self) -> None:
        """An empty package list or a missing one is a configuration error."""
        self.assertRaises(ConfigError, ConsumerHarness, PackageWatchPlugin(), {"packages": []})
        self.assertRaises(ConfigError, ConsumerHarness, PackageWatchPlugin(), {})
        self.assertRaises(ConfigError, ConsumerHarness, PackageWatchPlugin(), {"packages": [""]})
