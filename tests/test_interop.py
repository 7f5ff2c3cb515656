"""
Interoperability with the deployed Fedora bus: fedora-messaging (its
C{api.publish} and its C{fedora-messaging consume} command) and fedhub on
the same RabbitMQ (the shared broker at 127.0.0.1:5672).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from fedhub.amqp.transport import AMQPBus
from fedhub.amqp.url import parse_url
from fedhub.interfaces import IDelivery
from fedhub.message import Message
from fedhub.topology import BindingSpec, QueueSpec, Topology
from tests.processes import reap
from tests.test_amqp_bus import LiveCase

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

#: A body of Koji's "tag" message as Fedora's bus carries it.
KOJI_TAG_BODY = next(
    m["body"]
    for m in json.loads(
        (Path(__file__).parent / "data" / "koji" / "fedora_messaging_bodies.json").read_text()
    )["messages"]
    if m["topic"] == "buildsys.tag"
)


def delete_queue(name: str) -> None:
    """
    Delete a queue on the shared broker, with what it holds; a queue that
    is not there is no error.
    """
    import pika

    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            5672,
            credentials=pika.PlainCredentials("guest", "guest"),
            socket_timeout=5,
            connection_attempts=1,
        )
    )
    try:
        connection.channel().queue_delete(name)
    finally:
        connection.close()


def fedora_messaging_config(directory: Path, **extra: str) -> Path:
    """
    A fedora-messaging configuration file for the shared broker.
    """
    lines = [f'amqp_url = "{BROKER_URL}"', 'publish_exchange = "amq.topic"', 'topic_prefix = ""']
    lines += [f'{key} = "{value}"' for key, value in extra.items()]
    lines += ["[client_properties]", 'app = "fedhub interop test"']
    lines += ["[log_config]", "version = 1", "disable_existing_loggers = false"]
    path = directory / "fedora-messaging.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class InteropTests(LiveCase):
    """
    Messages cross between fedora-messaging and fedhub intact.
    """

    timeout = 120

    async def bus(self) -> AMQPBus:
        bus = AMQPBus(
            "interop",
            parse_url(f"{BROKER_URL}?connection_name=fedhub-interop-{uuid.uuid4().hex}"),
            reactor=reactor,
        )
        bus.startService()
        self.addCleanup(bus.stopService)
        connected = bus.when_connected()
        connected.addTimeout(10, reactor)
        await connected
        return bus

    async def test_fedora_messaging_to_fedhub(self) -> None:
        """A message from fedora-messaging's api.publish reaches a fedhub subscriber with topic, body, headers and id intact."""
        token = uuid.uuid4().hex
        topic = f"org.fedoraproject.test.interop.{token}"
        queue = f"fedhub.test.interop.{token}"
        # Registered before the bus, so it runs once the bus has stopped (a
        # running bus consumes again from a queue deleted under it, and
        # declares it again when it reconnects).  x-expires alone leaves the
        # queue for a minute, with the message if its acknowledgement was
        # not written: the test ends, and the bus stops, while the delivery
        # is still being handled.
        self.addCleanup(deferToThread, delete_queue, queue)
        bus = await self.bus()
        await bus.declare(
            Topology(
                queues=(QueueSpec(queue, durable=False, arguments={"x-expires": 60000}),),
                bindings=(BindingSpec(queue, "amq.topic", topic),),
            )
        )
        received: Deferred[Message] = Deferred()

        def on_delivery(delivery: IDelivery) -> None:
            delivery.ack()
            if not received.called:
                received.callback(delivery.message)

        await bus.subscribe(queue, on_delivery, 10)
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        script = textwrap.dedent(
            f"""
            import json
            from fedora_messaging import api, message
            m = message.Message(
                topic={topic!r},
                body={{"package": "kernel", "n": 1, "nested": {{"list": [1, "two", None]}}}},
                headers={{"custom": "value", "fedora_messaging_user_jdoe": True}},
                severity=message.WARNING,
            )
            api.publish(m)
            print(json.dumps({{"id": m.id, "headers": m._headers}}))
            """
        )
        env = dict(os.environ, FEDORA_MESSAGING_CONF=str(fedora_messaging_config(directory)))
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60,
            cwd=str(directory),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        sent = json.loads(result.stdout.strip().splitlines()[-1])
        received.addTimeout(15, reactor)
        message = await received
        self.assertEqual(message.id, sent["id"])
        self.assertEqual(message.topic, topic)
        self.assertEqual(message.body, {"package": "kernel", "n": 1, "nested": {"list": [1, "two", None]}})
        self.assertEqual(message.severity, 30)
        self.assertEqual(message.schema, "base.message")
        self.assertEqual(message.headers["custom"], "value")
        self.assertIs(message.headers["fedora_messaging_user_jdoe"], True)
        assert message.sent_at is not None
        self.assertEqual(message.sent_at.isoformat(), sent["headers"]["sent-at"])
        self.assertEqual(message.queue, queue)

    async def test_fedhub_to_fedora_messaging_consume(self) -> None:
        """`fedora-messaging consume` with a callback accepts every message fedhub publishes, schema headers included."""
        bus = await self.bus()
        token = uuid.uuid4().hex
        queue = f"fedhub.test.fm-consume.{token}"
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        out = directory / "received.jsonl"
        (directory / "fm_callback.py").write_text(
            textwrap.dedent(
                f"""
                import json
                from fedora_messaging.exceptions import HaltConsumer
                seen = []
                def callback(message):
                    message.validate()
                    record = {{"id": message.id, "topic": message.topic, "body": message.body,
                              "severity": message.severity, "headers": message._headers,
                              "class": type(message).__name__}}
                    with open({str(out)!r}, "a") as f:
                        f.write(json.dumps(record) + "\\n")
                    seen.append(message.id)
                    if len(seen) == 3:
                        raise HaltConsumer(exit_code=0)
                """
            )
        )
        messages = [
            Message.create(f"org.fedoraproject.test.fm.{token}.build", {"build_id": 1, "owner": "jdoe"},
                           headers={"fedora_messaging_user_jdoe": True, "fedora_messaging_rpm_kernel": True}),
            Message.create(f"org.fedoraproject.test.fm.{token}.tag", {"tag": "f44", "é": "ü"}, severity=40),
            Message.create(f"org.fedoraproject.test.fm.{token}.tag", KOJI_TAG_BODY,
                           schema="koji_fedoramessaging.tag.TagV1"),
        ]
        env = dict(os.environ, FEDORA_MESSAGING_CONF=str(fedora_messaging_config(directory)),
                   PYTHONPATH=str(directory))
        consumer = subprocess.Popen(
            [str(Path(sys.executable).parent / "fedora-messaging"), "consume",
             "--callback", "fm_callback:callback", "--queue-name", queue,
             "--routing-key", f"org.fedoraproject.test.fm.{token}.#", "--exchange", "amq.topic"],
            env=env, cwd=str(directory), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

        # Its queue is exclusive to its connection: the broker deletes it
        # once the process is gone.
        self.addCleanup(reap, consumer)
        # Publish once the consumer's queue is bound: until then a publish is returned.
        pending = list(messages)
        for _ in range(200):
            if not pending:
                break
            try:
                await bus.publish(pending[0])
            except Exception:
                from twisted.internet.task import deferLater

                await deferLater(reactor, 0.1, lambda: None)
                continue
            pending.pop(0)
        self.assertEqual(pending, [])
        output, _ = await deferToThread(consumer.communicate, timeout=60)
        self.assertEqual(consumer.returncode, 0, output)
        records: list[dict[str, Any]] = [json.loads(line) for line in out.read_text().splitlines()]
        self.assertEqual([r["id"] for r in records], [m.id for m in messages])
        for record, message in zip(records, messages):
            self.assertEqual(record["topic"], message.topic)
            self.assertEqual(record["body"], message.body)
            self.assertEqual(record["severity"], message.severity)
            self.assertEqual(record["headers"]["fedora_messaging_schema"], message.schema)
            self.assertEqual(record["headers"]["sent-at"], message.wire_headers()["sent-at"])
        self.assertIs(records[0]["headers"]["fedora_messaging_rpm_kernel"], True)
        # The Koji schema name is known to fedora-messaging through the installed schema package.
        self.assertEqual(records[2]["class"], "TagV1")
        self.assertEqual(records[0]["class"], "Message")
