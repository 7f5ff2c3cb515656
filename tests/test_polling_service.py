"""
Tests for L{fedhub.producers.poller.polling_service}: the service a
plugin's C{build} wraps its source in, run as a plugin author's test runs it.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fedhub.config import HubSettings
from fedhub.plugins import PluginContext
from fedhub.producers.poller import polling_service

from tests.test_poller import FakePublisher, FakeSource


class FakeClockTests(SynchronousTestCase):
    """
    A context whose reactor is a fake clock, as docs/configuration.md tells
    plugin authors to pass: there is no thread pool.
    """

    def test_polls_on_a_clock(self) -> None:
        """
        The service polls, publishes and keeps its cursor with a
        L{Clock} for a reactor: the blocking cursor I/O runs at once
        instead of in a thread pool the clock does not have.
        """
        clock = Clock()
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        publisher = FakePublisher()
        source = FakeSource(["a", "b", "c"])
        context = PluginContext(
            name="files", domain="test", options={"interval": 30.0, "jitter": 0.0},
            publisher=publisher, reactor=clock, hub=HubSettings(state_dir=state_dir),
        )
        service = polling_service(context, source)
        service.startService()
        clock.advance(0)
        self.assertEqual(publisher.bodies(), ["a", "b", "c"])
        self.assertEqual((service.polls, service.errors), (1, 0))
        source.events.append("d")
        clock.advance(30)
        self.assertEqual(publisher.bodies(), ["a", "b", "c", "d"])
        self.assertEqual(service.errors, 0)
        self.successResultOf(service.stopService())
